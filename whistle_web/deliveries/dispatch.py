"""Channel workers: claim a batch's deliveries, render, send, record. One job per batch.

Deliveries are claimed in chunks with ``FOR UPDATE SKIP LOCKED`` and marked ``sending`` in
their own commit before anything goes out, so two workers never send the same delivery
and a retried batch never sends one that is already ``sent``. A worker killed while a
chunk is ``sending`` leaves it there; the sweeper marks such deliveries failed instead of
sending them again (at most once beats a duplicate).

In-app deliveries are the inbox itself (DESIGN.md: "stored, then published"): a chunk is
locked with ``FOR UPDATE SKIP LOCKED``, rendered, marked ``sent`` and committed, and only
then published on Redis. Nothing goes out before the commit, so a crash before it sends
nothing and a crash after it loses at most the live push (the widget shows the item on its
next fetch); the ``sending`` step and its extra commit per chunk are not needed.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import redis
from flask import current_app
from jinja2 import TemplateError, meta
from jinja2.runtime import new_context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sqlalchemy import Text, cast, exists, func, select, text, update

from whistle_web import get_redis
from whistle_web.campaigns.models import Campaign, CampaignStatus
from whistle_web.channels.base import Message, ProviderUnavailable, SendResult, provider_class
from whistle_web.channels.in_app import frames_of, publish_frames
from whistle_web.channels.kinds import PUSH_DEVICE_KINDS, Channel, ProviderKind
from whistle_web.channels.models import Provider
from whistle_web.channels.ratelimit import bucket_for_provider
from whistle_web.deliveries.failures import counted_failures, failure_reason
from whistle_web.deliveries.ledger import CounterRow, bump_counters, suppress_address
from whistle_web.deliveries.models import BatchStatus, Delivery, DeliveryBatch
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.extensions import db
from whistle_web.inbox.outbox import draw_inbox_seqs
from whistle_web.message_templates.layout import EmailLayout, compile_layout
from whistle_web.message_templates.models import Template, TemplateVersion
from whistle_web.message_templates.rendering import (
    CompiledContent,
    RenderError,
    RenderLimitExceeded,
    compile_content,
    limited_concat,
)
from whistle_web.notifications.models import Notification, SendRequest, SendRequestStatus
from whistle_web.organizations.models import Organization
from whistle_web.preferences.models import SuppressionReason
from whistle_web.recipients.models import Device, Recipient
from whistle_web.tenancy import TenantScopeError

log = logging.getLogger(__name__)

CHUNK_SIZE = {
    Channel.EMAIL: 100,
    Channel.SMS: 100,
    Channel.PUSH: 200,
    # One statement locks, one marks sent, one script call per 1,000 publishes: bigger is
    # cheaper, and a pause still stops within one chunk.
    Channel.IN_APP: 2500,
    Channel.WEBHOOK: 50,
}
MAX_ATTEMPTS = 5


# Bulk UPDATEs of a chunk join the deliveries to the chunk's values (``v``) on the primary key
# and put no other condition on ``deliveries``: with missing or stale statistics (a new
# tenant's first big send, autovacuum behind a bulk insert) any extra condition makes the
# planner expect one matching row and scan every value for each candidate row, or walk the
# tenant's whole index for every chunk. The rows are locked first (the in-app chunk by its
# claim, the others by _lock_still_sending) and the tenant is checked on what the UPDATE
# returns (_counted).


def backoff(attempt: int) -> timedelta:
    """30 s, 2 min, 8 min, 32 min: exponential, base 4."""
    return timedelta(seconds=30 * 4 ** max(0, attempt - 1))


@lru_cache(maxsize=256)
def _compiled(version_id: int, content_json: str) -> CompiledContent:
    return compile_content(json.loads(content_json))


_JINJA_MARKS = ("{{", "{%", "{#")
_parser = ImmutableSandboxedEnvironment()


@dataclass(frozen=True)
class ChannelTemplate:
    """One channel's fields, compiled once per template version, for rendering per delivery.

    Plain-text fields are rendered once. The others share one context per delivery (the
    globals merged in once, ``shared=True``) instead of copying it for every field as
    ``Template.render`` does; any exception falls back to :meth:`CompiledContent.render`,
    which reports the error as it always has.
    """

    channel: str
    compiled: CompiledContent
    variable: tuple[tuple[str, Any], ...]
    fixed: dict[str, Any]
    template_globals: dict[str, Any] | None  # None: render through ``compiled`` only
    # Whether any field reads ``unsubscribe_url`` / ``preferences_url`` (an HMAC per
    # delivery each when built).
    uses_unsubscribe_url: bool
    uses_preferences_url: bool

    def render(self, render_context: dict[str, Any]) -> dict[str, Any]:
        if self.template_globals is None:
            return self.compiled.render(self.channel, render_context)
        shared = {**self.template_globals, **render_context}
        content: dict[str, Any] = {}
        try:
            for name, template in self.variable:
                # What Template.new_context does, with the globals flattened once (the
                # template's own are a ChainMap, walked again for every context).
                context = new_context(
                    template.environment,
                    template.name,
                    template.blocks,
                    shared,
                    shared=True,
                    globals=self.template_globals,
                )
                content[name] = limited_concat(template.root_render_func(context))
        except RenderLimitExceeded as error:
            raise RenderError(f"{self.channel}.{name}: {error.message}") from error
        except Exception:  # rendered again below, to report the error as usual
            return self.compiled.render(self.channel, render_context)
        content.update(self.fixed)
        return content


@lru_cache(maxsize=256)
def _channel_template(version_id: int, content_json: str, channel: str) -> ChannelTemplate:
    compiled = _compiled(version_id, content_json)
    sources = json.loads(content_json).get(channel)
    fields = compiled.fields.get(channel, {})
    variable: list[tuple[str, Any]] = []
    fixed: dict[str, Any] = {}
    names: set[str] = set()
    fast = True
    for name, template in fields.items():
        source = sources.get(name) if isinstance(sources, dict) else None
        if template is None:
            continue  # not text: rendering skips it
        if isinstance(template, RenderError):
            fast = False  # rendering reports it for every delivery
            continue
        if isinstance(source, str) and not any(m in source for m in _JINJA_MARKS):
            # Plain text renders the same for everyone: render it once.
            fixed[name] = CompiledContent({channel: {name: template}}).render(channel, {})[name]
            continue
        variable.append((name, template))
        if isinstance(source, str):
            try:
                names |= meta.find_undeclared_variables(_parser.parse(source))
            except TemplateError:
                names |= {"unsubscribe_url", "preferences_url"}
    template_globals = [dict(t.globals) for _, t in variable]
    if any(g != template_globals[0] for g in template_globals):
        fast = False
    return ChannelTemplate(
        channel=channel,
        compiled=compiled,
        variable=tuple(variable),
        fixed=fixed,
        template_globals=(template_globals[0] if template_globals else {}) if fast else None,
        uses_unsubscribe_url="unsubscribe_url" in names or not fast,
        uses_preferences_url="preferences_url" in names or not fast,
    )


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
    # Read per delivery: plain values, which the commit after every chunk does not expire.
    organization_id: int = 0
    organization_name: str = ""
    channel_template: ChannelTemplate | None = None
    # The organization's email layout (email batches only), wrapped around each HTML body.
    layout: EmailLayout | None = None
    counters: list[CounterRow] = field(default_factory=list)

    def render(self, render_context: dict[str, Any]) -> dict[str, Any]:
        """This channel's fields for one delivery."""
        if self.channel_template is None:
            return self.compiled.render(self.channel.value, render_context)
        return self.channel_template.render(render_context)

    @classmethod
    def load(
        cls, request: SendRequest, channel: Channel, providers: list[Provider] | None = None
    ) -> ChannelContext:
        """Load what a batch needs; ``providers``: the channel's enabled providers by
        priority, when the caller loaded them already."""
        version = db.session.get(TemplateVersion, request.template_version_id)
        if providers is None:
            providers = list(
                db.session.scalars(
                    select(Provider)
                    .where(Provider.channel == channel, Provider.enabled.is_(True))
                    .order_by(Provider.priority, Provider.id)
                )
            )
        config = current_app.config
        content_json = json.dumps(version.content, sort_keys=True)
        organization = db.session.get(Organization, request.organization_id)
        return cls(
            request=request,
            channel=channel,
            template=db.session.get(Template, request.template_id),
            compiled=_compiled(version.id, content_json),
            channel_template=_channel_template(version.id, content_json, channel.value),
            providers=providers,
            organization=organization,
            organization_id=organization.id,
            organization_name=organization.name,
            layout=compile_layout(organization.settings) if channel == Channel.EMAIL else None,
            base_url=config["WHISTLE_BASE_URL"],
            secret=config["SECRET_KEY"],
            allow_private_webhooks=bool(config.get("WHISTLE_WEBHOOK_ALLOW_PRIVATE", False)),
        )


def run_batch(batch_id: int) -> str:
    """Send everything of one batch that is due, or plan a planning slice (see
    planner.cut_slices). Returns what happened (for the job log)."""
    batch = db.session.get(DeliveryBatch, batch_id)
    if batch is None or batch.status == BatchStatus.DONE:
        return "nothing to do"
    request = db.session.get(SendRequest, batch.send_request_id)
    request_id = request.id
    halted = _halted(request_id)
    if halted == "cancelled":
        _cancel_rest(batch)
        _finish(batch)
        db.session.commit()
        check_completion(request_id)
        return "cancelled"
    if halted == "paused":
        return "paused"
    batch.status = BatchStatus.RUNNING
    batch.attempts += 1
    batch.heartbeat_at = datetime.now(UTC)
    db.session.commit()
    if batch.channel is None:  # a planning slice
        from whistle_web.deliveries.planner import plan_slice

        outcome = plan_slice(batch, request)
        check_completion(request_id)
        return outcome

    context = ChannelContext.load(request, Channel(batch.channel))
    stored = stored_provider(context)
    stored_id = stored.id if stored is not None else None
    limit = CHUNK_SIZE[context.channel]
    sent = 0
    # Chunks are taken in id order after the last one: the index scan starts past the rows
    # this job already handled instead of stepping over their dead index entries each time.
    after_id = 0
    while True:
        if stored is not None:
            handled, ok, after_id = store_and_publish(batch_id, limit, context, stored_id, after_id)
            if not handled:
                break
            sent += ok
            short = handled < limit
        else:
            claimed = claim(batch_id, limit, after_id)
            if not claimed:
                break
            after_id = max(claimed)
            sent += deliver(claimed, context)
            _heartbeat(batch_id)
            db.session.commit()
            short = len(claimed) < limit
        if short:
            # A short chunk took everything that was due and free: what is left is deferred
            # or held by another job, and _settle sees to it. No empty query to prove it.
            break
        state = _halted(request_id)
        if state:
            if state == "cancelled":
                _cancel_rest(batch)
                _finish(batch)
                db.session.commit()
            return f"{state} after {sent}"
    outcome = _settle(batch)
    db.session.commit()
    check_completion(request_id)
    return f"sent {sent}; {outcome}"


def _heartbeat(batch_id: int) -> None:
    """Tell the sweeper this batch's worker is alive (in the caller's transaction)."""
    db.session.execute(
        update(DeliveryBatch)
        .where(DeliveryBatch.id == batch_id)
        .values(heartbeat_at=datetime.now(UTC))
        .execution_options(synchronize_session=False)
    )


def claim(batch_id: int, limit: int, after_id: int = 0) -> list[int]:
    """Mark up to ``limit`` due queued deliveries of the batch with ids above ``after_id`` as
    sending; commit; return their ids.
    """
    due = (
        select(Delivery.id)
        .where(
            Delivery.batch_id == batch_id,
            Delivery.id > after_id,
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


def _delivery_rows() -> Any:
    """What rendering and sending need of each delivery, its recipient and notification."""
    return (
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
            # As text: a send's notifications usually share one ``data``, parsed once.
            cast(Notification.data, Text).label("data_json"),
        )
        .join(Notification, Notification.id == Delivery.notification_id)
        .outerjoin(Recipient, Recipient.id == Delivery.recipient_id)
    )


def deliver(delivery_ids: list[int], context: ChannelContext) -> int:
    """Render and send claimed deliveries, then record every outcome. Returns how many sent."""
    rows = db.session.execute(
        _delivery_rows().where(Delivery.id.in_(delivery_ids)).order_by(Delivery.id)
    ).all()
    devices = _devices(rows, context) if context.channel == Channel.PUSH else {}
    messages, rendered, failures = _render_all(rows, context, devices)
    if context.channel == Channel.IN_APP:
        draw_inbox_seqs(messages)  # published with the frame; _record stores a newer one
    outcomes = _send(messages, context) + [Outcome(f) for f in failures]
    _record(outcomes, rendered, {r.id: r.attempts for r in rows}, context)
    return sum(1 for o in _per_delivery(outcomes) if o.result.ok)


def _render_all(
    rows: list[Any], context: ChannelContext, devices: dict[int, list[Device]]
) -> tuple[list[Message], dict[int, dict[str, Any]], list[SendResult]]:
    """Messages to send, rendered content per delivery, and the deliveries that cannot go."""
    messages: list[Message] = []
    rendered: dict[int, dict[str, Any]] = {}
    failures: list[SendResult] = []
    parsed: dict[str, Any] = {}
    for row in rows:
        if row.recipient_id is None:
            failures.append(SendResult.failed(row.id, "the recipient was deleted"))
            continue
        data = parsed.get(row.data_json)
        if data is None:
            data = parsed[row.data_json] = json.loads(row.data_json) or {}
        try:
            content = context.render(render_context(row, context, data))
            built = _messages(row, content, context, devices, data)  # the layout may fail
        except RenderError as error:
            failures.append(SendResult.failed(row.id, f"template error: {error}"))
            continue
        if not built:
            failures.append(SendResult.failed(row.id, "no active device or address"))
            continue
        rendered[row.id] = content
        messages += built
    return messages, rendered, failures


def stored_provider(context: ChannelContext) -> Provider | None:
    """The in-app provider when the batch can take the store-then-publish path.

    A rate-limited in-app provider keeps the general path (it paces the sends).
    """
    if context.channel != Channel.IN_APP:
        return None
    if not context.providers:
        return Provider(id=None, name="in-app", kind=ProviderKind.IN_APP, settings={})
    provider = context.providers[0]
    if provider.kind != ProviderKind.IN_APP or provider.rate_limit_per_second is not None:
        return None
    return provider


def store_and_publish(
    batch_id: int,
    limit: int,
    context: ChannelContext,
    provider_id: int | None,
    after_id: int = 0,
) -> tuple[int, int, int]:
    """In-app: lock a chunk (ids above ``after_id``), render it, mark it sent and commit,
    then publish it.

    Returns:
        (deliveries handled, deliveries sent, the chunk's last id); (0, 0, after_id) when
        nothing is left to do.
    """
    rows = db.session.execute(
        _delivery_rows()
        .where(
            Delivery.batch_id == batch_id,
            Delivery.id > after_id,
            Delivery.status == DeliveryStatus.QUEUED,
            (Delivery.not_before.is_(None)) | (Delivery.not_before <= func.now()),
        )
        .order_by(Delivery.id)
        .limit(limit)
        .with_for_update(of=Delivery, skip_locked=True)
    ).all()
    if not rows:
        db.session.commit()
        return 0, 0, after_id
    messages, rendered, failures = _render_all(rows, context, {})
    now = datetime.now(UTC)
    org_id = context.organization_id
    counters: list[CounterRow] = []
    if messages:
        ids = [m.delivery_id for m in messages]
        returned = db.session.execute(
            text(
                "WITH changed AS ("
                " UPDATE deliveries AS d SET status = 'sent', sent_at = :now, updated_at = :now,"
                " attempts = d.attempts + 1, provider_id = :provider, rendered = v.rendered,"
                " error = NULL, inbox_seq = nextval('inbox_seq')"
                " FROM ROWS FROM (unnest(CAST(:ids AS bigint[])),"
                " jsonb_array_elements(CAST(:rendered AS jsonb))) AS v(id, rendered)"
                " WHERE d.id = v.id"
                " RETURNING d.organization_id, d.campaign_id, d.template_id, d.channel,"
                " d.id, d.inbox_seq)"
                " SELECT organization_id, campaign_id, template_id, channel, count(*),"
                " array_agg(id), array_agg(inbox_seq)"
                " FROM changed GROUP BY organization_id, campaign_id, template_id, channel"
            ),
            {
                "now": now,
                "provider": provider_id,
                "ids": "{" + ",".join(map(str, ids)) + "}",
                "rendered": json.dumps([rendered[i] for i in ids], separators=(",", ":")),
            },
        ).all()
        counters += _counted([r[:5] for r in returned], org_id, "sent", now)
        seqs = {i: seq for r in returned for i, seq in zip(r[5], r[6], strict=True)}
        for message in messages:
            message.meta["seq"] = seqs[message.delivery_id]  # the published frame's seq
    if failures:
        returned = db.session.execute(
            text(
                "WITH changed AS ("
                " UPDATE deliveries AS d SET status = 'failed', failed_at = :now,"
                " updated_at = :now, attempts = d.attempts + 1, error = v.error,"
                " failure_reason = v.reason"
                " FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[]),"
                " CAST(:reasons AS text[])) AS v(id, error, reason)"
                " WHERE d.id = v.id"
                " RETURNING d.organization_id, d.campaign_id, d.template_id, d.channel,"
                " d.failure_reason)"
                " SELECT organization_id, campaign_id, template_id, channel, failure_reason,"
                " count(*) FROM changed"
                " GROUP BY organization_id, campaign_id, template_id, channel, failure_reason"
            ),
            {
                "now": now,
                "ids": [f.delivery_id for f in failures],
                "errors": [f.error or "failed" for f in failures],
                "reasons": [failure_reason(f).value for f in failures],
            },
        ).all()
        counters += counted_failures(returned, org_id, now)
    _heartbeat(batch_id)
    bump_counters(counters)  # last: the counter rows stay locked only until the commit
    db.session.commit()
    publish_stored(frames_of(messages), f"batch {batch_id}")
    return len(rows), len(messages), rows[-1].id


def publish_stored(frames: list[str], label: str) -> None:
    """Publish in-app items already stored as sent and committed (after the commit only):
    (channel, frame) pairs, flattened (``channels.in_app.frames_of``).

    A publish that fails only delays the item to the widget's next fetch or resume.
    """
    if not frames:
        return
    try:
        publish_frames(get_redis(), frames)
    except redis.RedisError as error:
        log.warning(
            "%s: %d in-app items stored but not pushed live: %s", label, len(frames) // 2, error
        )


def _counted(rows: Any, org_id: int, metric: str, at: datetime) -> list[CounterRow]:
    """Counter increments from an UPDATE's (organization, campaign, template, channel, n).

    Raises:
        TenantScopeError: a row of another organization was changed (rolls back the chunk).
    """
    counters = []
    for row_org, campaign_id, template_id, channel, count in rows:
        if row_org != org_id:
            raise TenantScopeError(f"a chunk of organization {org_id} reached another's rows")
        counters.append(CounterRow(campaign_id, template_id, channel, metric, at, count))
    return counters


def _lock_still_sending(ids: list[int], org_id: int) -> set[int]:
    """Lock the claimed deliveries still ``sending`` (the sweeper may have settled some)."""
    if not ids:
        return set()
    return set(
        db.session.scalars(
            text(
                # IS NOT DISTINCT FROM: PostgreSQL cannot use an index for it, so the rows are
                # found by primary key, never by walking the tenant's or the status's index.
                "SELECT d.id FROM deliveries AS d WHERE d.id = ANY(CAST(:ids AS bigint[]))"
                " AND (d.organization_id, d.status)"
                " IS NOT DISTINCT FROM (CAST(:org AS bigint), 'sending')"
                " FOR UPDATE"
            ),
            {"ids": "{" + ",".join(map(str, ids)) + "}", "org": org_id},
        )
    )


def recipient_context(recipient: Any) -> dict[str, Any]:
    """``recipient`` in a template: from a delivery row or a Recipient (same attribute names)."""
    return {
        "id": recipient.external_id,
        "external_id": recipient.external_id,
        "email": recipient.email,
        "phone": recipient.phone,
        "name": recipient.name,
        "locale": recipient.locale,
        "timezone": recipient.timezone,
        "attributes": recipient.attributes or {},
    }


def render_context(row: Any, context: ChannelContext, data: dict[str, Any]) -> dict[str, Any]:
    from whistle_web.tracking import links

    return {
        "recipient": recipient_context(row),
        "data": data,
        "organization": {"name": context.organization_name},
        # An HMAC per delivery: only when a field of this channel reads it.
        "unsubscribe_url": links.unsubscribe_url(
            context.base_url,
            context.secret,
            context.organization_id,
            row.recipient_id,
            row.id,
        )
        if context.channel_template is None or context.channel_template.uses_unsubscribe_url
        else "",
        # The hosted preference page; an HMAC per delivery too, so built on the same terms.
        "preferences_url": links.preferences_url(
            context.base_url, context.secret, context.organization_id, row.recipient_id
        )
        if context.channel_template is None or context.channel_template.uses_preferences_url
        else "",
    }


def _messages(
    row: Any,
    content: dict[str, Any],
    context: ChannelContext,
    devices: dict[int, list[Device]],
    data: dict[str, Any],
) -> list[Message]:
    meta = {
        "organization_id": context.organization_id,
        "recipient_id": row.recipient_id,
        "external_id": row.external_id,
        "notification_id": row.notification_id,
        "data": data,
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
                # The device's own data (Web Push keys, APNs topic...) never overrides ours.
                meta={
                    **device.data,
                    **meta,
                    "device_id": device.id,
                    "device_kind": device.kind.value,
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
            "data": data,
            "content": content,
        }
        return [Message(row.id, channel, "", {"payload": payload}, meta=meta)]
    return [Message(row.id, channel, row.external_id, content, meta=meta)]


def _email_message(
    row: Any, content: dict[str, Any], context: ChannelContext, meta: dict[str, Any]
) -> Message:
    from whistle_web.tracking import links

    unsubscribe = links.unsubscribe_url(
        context.base_url, context.secret, context.organization_id, row.recipient_id, row.id
    )
    body = dict(content)
    if body.get("html") and context.layout is not None:
        body["html"] = context.layout.apply(
            body["html"], _layout_context(row, context, meta["data"], unsubscribe)
        )
    if body.get("html"):
        body["html"] = links.rewrite_html(
            body["html"], base_url=context.base_url, secret=context.secret, delivery_id=row.id
        )
    sender = (context.providers[0].settings if context.providers else {}).get("from_email", "")
    domain = sender.rpartition("@")[2] or "whistle.invalid"
    headers = {
        # Stable per delivery: a receiving system can recognise a retry of the same message.
        "Message-ID": f"<whistle.{context.organization_id}.{row.id}@{domain}>",
        "List-Unsubscribe": f"<{unsubscribe}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    return Message(row.id, Channel.EMAIL, row.email, body, headers=headers, meta=meta)


def _layout_context(
    row: Any, context: ChannelContext, data: dict[str, Any], unsubscribe: str
) -> dict[str, Any]:
    """What the organization's email layout renders with: the message's own context."""
    from whistle_web.tracking import links

    return {
        "recipient": recipient_context(row),
        "data": data,
        "organization": {"name": context.organization_name},
        "unsubscribe_url": unsubscribe,
        "preferences_url": links.preferences_url(
            context.base_url, context.secret, context.organization_id, row.recipient_id
        ),
    }


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
        if provider.kind == ProviderKind.TWILIO and provider.id is not None:
            # Delivery receipts come back to our signed-callback endpoint unless staff chose
            # another URL in the provider's settings.
            settings.setdefault(
                "status_callback_url", f"{context.base_url.rstrip('/')}/hooks/twilio/{provider.id}"
            )
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
    return [m for m in pending if kind is not None and m.meta.get("device_kind") == kind]


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
    """Lock what is still ours, write every outcome set-based, count them in the funnels."""
    now = datetime.now(UTC)
    org_id = context.organization_id
    merged = _per_delivery(outcomes)
    still_sending = _lock_still_sending([o.result.delivery_id for o in merged], org_id)
    provider_of = {o.result.delivery_id: o.provider_id for o in merged}
    results = [o.result for o in merged if o.result.delivery_id in still_sending]
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
                "WITH changed AS ("
                " UPDATE deliveries AS d SET status = 'sent', sent_at = :now, updated_at = :now,"
                " provider_id = v.provider_id, provider_message_id = v.pmid,"
                " rendered = v.rendered, error = NULL, inbox_seq = CASE"
                " WHEN d.channel = 'in_app' THEN nextval('inbox_seq') ELSE d.inbox_seq END"
                " FROM ROWS FROM (unnest(CAST(:ids AS bigint[])),"
                " unnest(CAST(:providers AS bigint[])), unnest(CAST(:pmids AS text[])),"
                " jsonb_array_elements(CAST(:rendered AS jsonb)))"
                " AS v(id, provider_id, pmid, rendered)"
                " WHERE d.id = v.id"
                " RETURNING d.organization_id, d.campaign_id, d.template_id, d.channel)"
                " SELECT organization_id, campaign_id, template_id, channel, count(*)"
                " FROM changed GROUP BY organization_id, campaign_id, template_id, channel"
            ),
            {
                "now": now,
                "ids": [r.delivery_id for r in sent],
                "providers": [provider_of.get(r.delivery_id) for r in sent],
                "pmids": [r.provider_message_id for r in sent],
                "rendered": json.dumps([rendered.get(r.delivery_id) for r in sent]),
            },
        ).all()
        counters += _counted(returned, org_id, "sent", now)
    if failed:
        returned = db.session.execute(
            text(
                "WITH changed AS ("
                " UPDATE deliveries AS d SET status = 'failed', failed_at = :now,"
                " updated_at = :now, error = v.error, failure_reason = v.reason,"
                " provider_id = COALESCE(v.provider_id, d.provider_id)"
                " FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[]),"
                " CAST(:reasons AS text[]), CAST(:providers AS bigint[]))"
                " AS v(id, error, reason, provider_id)"
                " WHERE d.id = v.id"
                " RETURNING d.organization_id, d.campaign_id, d.template_id, d.channel,"
                " d.failure_reason)"
                " SELECT organization_id, campaign_id, template_id, channel, failure_reason,"
                " count(*) FROM changed"
                " GROUP BY organization_id, campaign_id, template_id, channel, failure_reason"
            ),
            {
                "now": now,
                "ids": [r.delivery_id for r in failed],
                "errors": [_failure_text(r, attempts) for r in failed],
                "reasons": [failure_reason(r).value for r in failed],
                "providers": [provider_of.get(r.delivery_id) for r in failed],
            },
        ).all()
        counters += counted_failures(returned, org_id, now)
    if retry:
        returned = db.session.execute(
            text(
                "WITH changed AS ("
                " UPDATE deliveries AS d SET status = 'queued', updated_at = :now,"
                " error = v.error, not_before = v.not_before"
                " FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[]),"
                " CAST(:not_before AS timestamptz[])) AS v(id, error, not_before)"
                " WHERE d.id = v.id"
                " RETURNING d.organization_id, d.campaign_id, d.template_id, d.channel)"
                " SELECT organization_id, campaign_id, template_id, channel, count(*)"
                " FROM changed GROUP BY organization_id, campaign_id, template_id, channel"
            ),
            {
                "now": now,
                "ids": [r.delivery_id for r in retry],
                "errors": [r.error for r in retry],
                "not_before": [now + backoff(attempts.get(r.delivery_id, 1)) for r in retry],
            },
        ).all()
        _counted(returned, org_id, "queued", now)  # the tenant check only: nothing to count
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
    # An address (not a device) the provider calls invalid, such as a phone number Twilio
    # rejects with 21211, is a hard bounce: the same code in a status callback suppresses it.
    for outcome in outcomes:
        message = outcome.message
        if (
            outcome.result.invalid_address
            and message is not None
            and "device_id" not in message.meta
            and outcome.result.delivery_id in still_sending
        ):
            suppress_address(
                message.channel,
                message.to,
                SuppressionReason.HARD_BOUNCE,
                delivery_id=outcome.result.delivery_id,
            )
    bump_counters(counters)
    db.session.commit()


def _failure_text(result: SendResult, attempts: dict[int, int]) -> str:
    if result.transient:
        return f"gave up after {attempts.get(result.delivery_id, 0)} attempts: {result.error}"
    return result.error or "failed"


def _halted(request_id: int) -> str | None:
    """ "cancelled" or "paused" when the send request or its campaign stopped (one query)."""
    request_status, campaign_status = db.session.execute(
        select(SendRequest.status, Campaign.status)
        .outerjoin(Campaign, Campaign.id == SendRequest.campaign_id)
        .where(SendRequest.id == request_id)
    ).one()
    if request_status == SendRequestStatus.CANCELLED:
        return "cancelled"
    if campaign_status == CampaignStatus.CANCELLED:
        return "cancelled"
    if campaign_status == CampaignStatus.PAUSED:
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
    if request.campaign_id is None:
        return  # a trigger's request has nothing to close
    # Called after every batch: the cheap check first, the scan of the ledger only at the end.
    open_batches = db.session.scalar(
        select(
            exists().where(
                DeliveryBatch.send_request_id == request.id,
                DeliveryBatch.status != BatchStatus.DONE,
            )
        )
    )
    if open_batches:
        return
    deferred = db.session.scalar(
        select(
            exists().where(
                # Every delivery of a campaign run carries the campaign: lets the campaign index
                # narrow the scan before the join to the run's notifications.
                Delivery.campaign_id == request.campaign_id,
                Delivery.status.in_([DeliveryStatus.QUEUED, DeliveryStatus.SENDING]),
                Delivery.notification_id.in_(
                    select(Notification.id).where(Notification.send_request_id == request.id)
                ),
            )
        )
    )
    if deferred:
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
