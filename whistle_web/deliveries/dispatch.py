"""Channel workers: claim a batch's deliveries, render, send, record. One job per batch.

Deliveries are claimed in chunks with ``FOR UPDATE SKIP LOCKED`` and marked ``sending`` in
their own commit before anything goes out, so two workers never send the same delivery
and a retried batch never sends one that is already ``sent``. A worker killed while a
chunk is ``sending`` leaves it there; the sweeper marks such deliveries failed instead of
sending them again (at most once beats a duplicate).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from flask import current_app
from sqlalchemy import exists, func, select, text, update

from whistle_web import get_redis
from whistle_web.campaigns.models import Campaign, CampaignStatus
from whistle_web.channels.base import Message, ProviderUnavailable, SendResult, provider_class
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.channels.models import Provider
from whistle_web.channels.ratelimit import bucket_for_provider
from whistle_web.deliveries.ledger import CounterRow, bump_counters
from whistle_web.deliveries.models import BatchStatus, Delivery, DeliveryBatch
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template, TemplateVersion
from whistle_web.message_templates.rendering import CompiledContent, RenderError, compile_content
from whistle_web.notifications.models import Notification, SendRequest, SendRequestStatus
from whistle_web.organizations.models import Organization
from whistle_web.recipients.models import Device, DeviceKind, Recipient

log = logging.getLogger(__name__)

CHUNK_SIZE = {
    Channel.EMAIL: 100,
    Channel.SMS: 100,
    Channel.PUSH: 200,
    Channel.IN_APP: 1000,
    Channel.WEBHOOK: 50,
}
MAX_ATTEMPTS = 5
PUSH_DEVICE_KINDS = {ProviderKind.FCM: DeviceKind.FCM, ProviderKind.WEBPUSH: DeviceKind.WEBPUSH}


def backoff(attempt: int) -> timedelta:
    """30 s, 2 min, 8 min, 32 min: exponential, base 4."""
    return timedelta(seconds=30 * 4 ** max(0, attempt - 1))


@lru_cache(maxsize=256)
def _compiled(version_id: int, content_json: str) -> CompiledContent:
    return compile_content(json.loads(content_json))


@dataclass
class ChannelContext:
    """What a batch needs, loaded once: template, providers, organization, links."""

    request: SendRequest
    channel: Channel
    template: Template
    compiled: CompiledContent
    providers: list[Provider]
    organization: Organization
    base_url: str
    secret: str
    allow_private_webhooks: bool
    counters: list[CounterRow] = field(default_factory=list)

    @classmethod
    def load(cls, request: SendRequest, channel: Channel) -> ChannelContext:
        version = db.session.get(TemplateVersion, request.template_version_id)
        providers = list(
            db.session.scalars(
                select(Provider)
                .where(Provider.channel == channel, Provider.enabled.is_(True))
                .order_by(Provider.priority, Provider.id)
            )
        )
        config = current_app.config
        return cls(
            request=request,
            channel=channel,
            template=db.session.get(Template, request.template_id),
            compiled=_compiled(version.id, json.dumps(version.content, sort_keys=True)),
            providers=providers,
            organization=db.session.get(Organization, request.organization_id),
            base_url=config["WHISTLE_BASE_URL"],
            secret=config["SECRET_KEY"],
            allow_private_webhooks=bool(config.get("WHISTLE_WEBHOOK_ALLOW_PRIVATE", False)),
        )


def run_batch(batch_id: int) -> str:
    """Send everything of one batch that is due. Returns what happened (for the job log)."""
    batch = db.session.get(DeliveryBatch, batch_id)
    if batch is None or batch.status == BatchStatus.DONE:
        return "nothing to do"
    request = db.session.get(SendRequest, batch.send_request_id)
    halted = _halted(request)
    if halted == "cancelled":
        _cancel_rest(batch)
        _finish(batch)
        db.session.commit()
        check_completion(request.id)
        return "cancelled"
    if halted == "paused":
        return "paused"
    batch.status = BatchStatus.RUNNING
    batch.attempts += 1
    batch.heartbeat_at = datetime.now(UTC)
    db.session.commit()

    context = ChannelContext.load(request, Channel(batch.channel))
    sent = 0
    while True:
        claimed = claim(batch.id, CHUNK_SIZE[context.channel])
        if not claimed:
            break
        sent += deliver(claimed, context)
        batch.heartbeat_at = datetime.now(UTC)
        db.session.commit()
        state = _halted(request)
        if state:
            if state == "cancelled":
                _cancel_rest(batch)
                _finish(batch)
                db.session.commit()
            return f"{state} after {sent}"
    outcome = _settle(batch)
    db.session.commit()
    check_completion(request.id)
    return f"sent {sent}; {outcome}"


def claim(batch_id: int, limit: int) -> list[int]:
    """Mark up to ``limit`` due queued deliveries of the batch as sending; commit; return ids."""
    due = (
        select(Delivery.id)
        .where(
            Delivery.batch_id == batch_id,
            Delivery.status == DeliveryStatus.QUEUED,
            (Delivery.not_before.is_(None)) | (Delivery.not_before <= func.now()),
        )
        .order_by(Delivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(
        db.session.scalars(
            update(Delivery)
            .where(Delivery.id.in_(due.scalar_subquery()))
            .values(status=DeliveryStatus.SENDING, attempts=Delivery.attempts + 1)
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        )
    )
    db.session.commit()
    return ids


def deliver(delivery_ids: list[int], context: ChannelContext) -> int:
    """Render and send claimed deliveries, then record every outcome. Returns how many sent."""
    rows = db.session.execute(
        select(
            Delivery.id,
            Delivery.notification_id,
            Delivery.attempts,
            Delivery.address,
            Delivery.created_at,
            Recipient.id.label("recipient_id"),
            Recipient.external_id,
            Recipient.email,
            Recipient.phone,
            Recipient.name,
            Recipient.locale,
            Recipient.timezone,
            Recipient.attributes,
            Notification.data,
        )
        .join(Notification, Notification.id == Delivery.notification_id)
        .outerjoin(Recipient, Recipient.id == Delivery.recipient_id)
        .where(Delivery.id.in_(delivery_ids))
        .order_by(Delivery.id)
    ).all()
    devices = _devices(rows, context) if context.channel == Channel.PUSH else {}
    messages: list[Message] = []
    rendered: dict[int, dict[str, Any]] = {}
    failures: list[SendResult] = []
    for row in rows:
        if row.recipient_id is None:
            failures.append(SendResult.failed(row.id, "the recipient was deleted"))
            continue
        try:
            content = context.compiled.render(context.channel.value, _render_context(row, context))
        except RenderError as error:
            failures.append(SendResult.failed(row.id, f"template error: {error}"))
            continue
        built = _messages(row, content, context, devices)
        if not built:
            failures.append(SendResult.failed(row.id, "no active device or address"))
            continue
        rendered[row.id] = content
        messages += built
    outcomes = _send(messages, context) + [Outcome(f) for f in failures]
    _record(outcomes, rendered, {r.id: r.attempts for r in rows}, context)
    return sum(1 for o in _per_delivery(outcomes) if o.result.ok)


def _render_context(row: Any, context: ChannelContext) -> dict[str, Any]:
    from whistle_web.tracking import links

    return {
        "recipient": {
            "id": row.external_id,
            "external_id": row.external_id,
            "email": row.email,
            "phone": row.phone,
            "name": row.name,
            "locale": row.locale,
            "timezone": row.timezone,
            "attributes": row.attributes or {},
        },
        "data": row.data or {},
        "organization": {"name": context.organization.name},
        "unsubscribe_url": links.unsubscribe_url(
            context.base_url,
            context.secret,
            context.organization.id,
            row.recipient_id,
            row.id,
        ),
    }


def _messages(
    row: Any, content: dict[str, Any], context: ChannelContext, devices: dict[int, list[Device]]
) -> list[Message]:
    meta = {
        "organization_id": context.organization.id,
        "recipient_id": row.recipient_id,
        "external_id": row.external_id,
        "notification_id": row.notification_id,
        "data": row.data or {},
        "created_at": row.created_at.isoformat(),
    }
    channel = context.channel
    if channel == Channel.EMAIL:
        if not row.email:
            return []
        return [_email_message(row, content, context, meta)]
    if channel == Channel.SMS:
        return [Message(row.id, channel, row.phone, content, meta=meta)] if row.phone else []
    if channel == Channel.PUSH:
        return [
            Message(
                row.id,
                channel,
                device.token,
                content,
                meta={
                    **meta,
                    "device_id": device.id,
                    "device_kind": device.kind.value,
                    **device.data,
                },
            )
            for device in devices.get(row.recipient_id, [])
        ]
    if channel == Channel.WEBHOOK:
        payload = {
            "type": "notification",
            "delivery_id": row.id,
            "notification_id": row.notification_id,
            "template": context.template.key,
            "recipient": {"external_id": row.external_id, "email": row.email, "phone": row.phone},
            "data": row.data or {},
            "content": content,
        }
        return [Message(row.id, channel, "", {"payload": payload}, meta=meta)]
    return [Message(row.id, channel, row.external_id, content, meta=meta)]


def _email_message(
    row: Any, content: dict[str, Any], context: ChannelContext, meta: dict[str, Any]
) -> Message:
    from whistle_web.tracking import links

    unsubscribe = links.unsubscribe_url(
        context.base_url, context.secret, context.organization.id, row.recipient_id, row.id
    )
    body = dict(content)
    if body.get("html"):
        body["html"] = links.rewrite_html(
            body["html"], base_url=context.base_url, secret=context.secret, delivery_id=row.id
        )
    sender = (context.providers[0].settings if context.providers else {}).get("from_email", "")
    domain = sender.rpartition("@")[2] or "whistle.invalid"
    headers = {
        # Stable per delivery: a receiving system can recognise a retry of the same message.
        "Message-ID": f"<whistle.{context.organization.id}.{row.id}@{domain}>",
        "List-Unsubscribe": f"<{unsubscribe}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    return Message(row.id, Channel.EMAIL, row.email, body, headers=headers, meta=meta)


def _devices(rows: list[Any], context: ChannelContext) -> dict[int, list[Device]]:
    kinds = {PUSH_DEVICE_KINDS[p.kind] for p in context.providers if p.kind in PUSH_DEVICE_KINDS}
    recipient_ids = [r.recipient_id for r in rows if r.recipient_id is not None]
    found: dict[int, list[Device]] = defaultdict(list)
    if not kinds or not recipient_ids:
        return found
    for device in db.session.scalars(
        select(Device).where(
            Device.recipient_id.in_(recipient_ids),
            Device.kind.in_(kinds),
            Device.disabled_at.is_(None),
        )
    ):
        found[device.recipient_id].append(device)
    return found


@dataclass(frozen=True)
class Outcome:
    """What happened to one message (a push delivery has one message per device)."""

    result: SendResult
    message: Message | None = None
    provider_id: int | None = None


def _send(messages: list[Message], context: ChannelContext) -> list[Outcome]:
    """Send through the channel's providers by priority, failing over when one is down."""
    if not messages:
        return []
    providers = context.providers
    if not providers and context.channel == Channel.IN_APP:
        # In-app needs no credentials: without a configured provider, use the built-in one.
        providers = [Provider(id=None, name="in-app", kind=ProviderKind.IN_APP, settings={})]
    if not providers:
        error = f"no enabled {context.channel.value} provider"
        return [Outcome(SendResult.failed(m.delivery_id, error), m) for m in messages]
    pending = messages
    outcomes: list[Outcome] = []
    last_error = "unavailable"
    redis = get_redis()
    for provider in providers:
        mine = _messages_for(provider, pending, context)
        if not mine:
            continue
        settings = dict(provider.settings or {})
        if provider.kind == ProviderKind.WEBHOOK and context.allow_private_webhooks:
            settings.setdefault("allow_private_networks", True)
        credentials = provider.get_credentials() if provider.id is not None else {}
        bucket = (
            bucket_for_provider(redis, provider.id, provider.rate_limit_per_second)
            if provider.id is not None
            else None
        )
        done = 0
        try:
            with provider_class(provider.kind)(settings, credentials, redis=redis) as impl:
                while done < len(mine):
                    n = bucket.acquire(len(mine) - done) if bucket else len(mine) - done
                    if n == 0:
                        break  # rate limited for too long: the rest is retried later
                    chunk = mine[done : done + n]
                    results = impl.send_batch(chunk)
                    outcomes += [
                        Outcome(r, m, provider.id) for m, r in zip(chunk, results, strict=True)
                    ]
                    done += n
        except ProviderUnavailable as error:
            last_error = f"{provider.name}: {error}"
            log.warning("provider %s unavailable, failing over: %s", provider.id, error)
        handled = {id(m) for m in mine[:done]}
        pending = [m for m in pending if id(m) not in handled]
        if not pending:
            break
    error = f"all providers unavailable ({last_error})"
    outcomes += [
        Outcome(SendResult.failed(m.delivery_id, error, transient=True), m) for m in pending
    ]
    return outcomes


def _messages_for(
    provider: Provider, pending: list[Message], context: ChannelContext
) -> list[Message]:
    """Push messages go to the provider of their device's kind; others to any provider."""
    if context.channel != Channel.PUSH:
        return pending
    kind = PUSH_DEVICE_KINDS.get(ProviderKind(provider.kind))
    return [m for m in pending if kind is not None and m.meta.get("device_kind") == kind.value]


def _per_delivery(outcomes: list[Outcome]) -> list[Outcome]:
    """One outcome per delivery: a push delivery succeeds when any device accepted it."""
    by_delivery: dict[int, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_delivery[outcome.result.delivery_id].append(outcome)
    merged = []
    for parts in by_delivery.values():
        ok = [p for p in parts if p.result.ok]
        transient = [p for p in parts if p.result.transient]
        merged.append(ok[0] if ok else transient[0] if transient else parts[0])
    return merged


def _record(
    outcomes: list[Outcome],
    rendered: dict[int, dict[str, Any]],
    attempts: dict[int, int],
    context: ChannelContext,
) -> None:
    """Write every outcome in three set-based statements, and count them in the funnels."""
    now = datetime.now(UTC)
    org_id = context.organization.id
    merged = _per_delivery(outcomes)
    provider_of = {o.result.delivery_id: o.provider_id for o in merged}
    results = [o.result for o in merged]
    sent = [r for r in results if r.ok]
    retry = [
        r
        for r in results
        if not r.ok and r.transient and attempts.get(r.delivery_id, 0) < MAX_ATTEMPTS
    ]
    failed = [r for r in results if not r.ok and r not in retry]
    counters: list[CounterRow] = []
    if sent:
        returned = db.session.execute(
            text(
                "UPDATE deliveries AS d SET status = 'sent', sent_at = :now, updated_at = :now,"
                " provider_id = v.provider_id, provider_message_id = v.pmid,"
                " rendered = CAST(v.rendered AS jsonb), error = NULL"
                " FROM unnest(CAST(:ids AS bigint[]), CAST(:providers AS bigint[]),"
                " CAST(:pmids AS text[]), CAST(:rendered AS text[]))"
                " AS v(id, provider_id, pmid, rendered)"
                " WHERE d.id = v.id AND d.organization_id = :org AND d.status = 'sending'"
                " RETURNING d.campaign_id, d.template_id, d.channel"
            ),
            {
                "now": now,
                "org": org_id,
                "ids": [r.delivery_id for r in sent],
                "providers": [provider_of.get(r.delivery_id) for r in sent],
                "pmids": [r.provider_message_id for r in sent],
                "rendered": [json.dumps(rendered.get(r.delivery_id)) for r in sent],
            },
        ).all()
        counters += [CounterRow(c, t, ch, "sent", now) for c, t, ch in returned]
    if failed:
        returned = db.session.execute(
            text(
                "UPDATE deliveries AS d SET status = 'failed', failed_at = :now, updated_at = :now,"
                " error = v.error, provider_id = COALESCE(v.provider_id, d.provider_id)"
                " FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[]),"
                " CAST(:providers AS bigint[])) AS v(id, error, provider_id)"
                " WHERE d.id = v.id AND d.organization_id = :org AND d.status = 'sending'"
                " RETURNING d.campaign_id, d.template_id, d.channel"
            ),
            {
                "now": now,
                "org": org_id,
                "ids": [r.delivery_id for r in failed],
                "errors": [_failure_text(r, attempts) for r in failed],
                "providers": [provider_of.get(r.delivery_id) for r in failed],
            },
        ).all()
        counters += [CounterRow(c, t, ch, "failed", now) for c, t, ch in returned]
    if retry:
        db.session.execute(
            text(
                "UPDATE deliveries AS d SET status = 'queued', updated_at = :now,"
                " error = v.error, not_before = v.not_before"
                " FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[]),"
                " CAST(:not_before AS timestamptz[])) AS v(id, error, not_before)"
                " WHERE d.id = v.id AND d.organization_id = :org AND d.status = 'sending'"
            ),
            {
                "now": now,
                "org": org_id,
                "ids": [r.delivery_id for r in retry],
                "errors": [r.error for r in retry],
                "not_before": [now + backoff(attempts.get(r.delivery_id, 1)) for r in retry],
            },
        )
    dead_devices = [
        o.message.meta["device_id"]
        for o in outcomes
        if o.result.invalid_address and o.message is not None and "device_id" in o.message.meta
    ]
    if dead_devices:
        # The provider says these tokens will never work again: stop targeting them.
        db.session.execute(
            update(Device)
            .where(Device.id.in_(dead_devices), Device.disabled_at.is_(None))
            .values(disabled_at=now)
            .execution_options(synchronize_session=False)
        )
    bump_counters(counters)
    db.session.commit()


def _failure_text(result: SendResult, attempts: dict[int, int]) -> str:
    if result.transient:
        return f"gave up after {attempts.get(result.delivery_id, 0)} attempts: {result.error}"
    return result.error or "failed"


def _halted(request: SendRequest) -> str | None:
    db.session.refresh(request, ["status"])
    if request.status == SendRequestStatus.CANCELLED:
        return "cancelled"
    if request.campaign_id is None:
        return None
    status = db.session.scalar(select(Campaign.status).where(Campaign.id == request.campaign_id))
    if status == CampaignStatus.CANCELLED:
        return "cancelled"
    if status == CampaignStatus.PAUSED:
        return "paused"
    return None


def _cancel_rest(batch: DeliveryBatch) -> None:
    from whistle_web.notifications.services import cancel_queued_deliveries

    cancel_queued_deliveries(Delivery.batch_id == batch.id)


def _finish(batch: DeliveryBatch) -> None:
    batch.status = BatchStatus.DONE
    batch.finished_at = datetime.now(UTC)


def _settle(batch: DeliveryBatch) -> str:
    """Close the batch when nothing is left, or leave it for its deferred deliveries."""
    waiting = db.session.scalar(
        select(func.min(func.coalesce(Delivery.not_before, func.now()))).where(
            Delivery.batch_id == batch.id, Delivery.status == DeliveryStatus.QUEUED
        )
    )
    if waiting is None:
        _finish(batch)
        return "done"
    batch.status = BatchStatus.PENDING
    batch.enqueued_at = None
    return f"retrying from {waiting.isoformat()}"


def check_completion(send_request_id: int) -> None:
    """Close the send request, and its campaign run, once nothing of it is left to send."""
    request = db.session.get(SendRequest, send_request_id)
    if request is None or request.status not in (
        SendRequestStatus.PLANNED,
        SendRequestStatus.CANCELLED,
    ):
        return
    open_batches = db.session.scalar(
        select(
            exists().where(
                DeliveryBatch.send_request_id == request.id,
                DeliveryBatch.status != BatchStatus.DONE,
            )
        )
    )
    deferred = db.session.scalar(
        select(
            exists().where(
                Delivery.notification_id.in_(
                    select(Notification.id).where(Notification.send_request_id == request.id)
                ),
                Delivery.status.in_([DeliveryStatus.QUEUED, DeliveryStatus.SENDING]),
            )
        )
    )
    if open_batches or deferred or request.campaign_id is None:
        return
    campaign = db.session.scalar(
        select(Campaign).where(Campaign.id == request.campaign_id).with_for_update()
    )
    if campaign is None or campaign.status != CampaignStatus.SENDING:
        db.session.commit()
        return
    now = datetime.now(UTC)
    if campaign.cron:
        campaign.status = CampaignStatus.SCHEDULED
    else:
        campaign.status = CampaignStatus.COMPLETED
        campaign.completed_at = now
    db.session.commit()
