"""Triggering notifications: the entry point for the API, the console and the scheduler.

Nothing is sent here. A trigger writes one send request and enqueues one planning job
after the commit; the planner and channel workers do the rest (DESIGN.md "The send path").
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from whistle_web.audiences.models import Segment, Topic
from whistle_web.channels.kinds import Channel
from whistle_web.deliveries.ledger import CounterRow, bump_counters
from whistle_web.deliveries.models import Delivery
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.errors import Actor, FieldError, InvalidState, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template, TemplateVersion
from whistle_web.notifications.models import (
    Notification,
    SendRequest,
    SendRequestKind,
    SendRequestStatus,
)
from whistle_web.organizations.services import record_audit
from whistle_web.recipients.models import Recipient
from whistle_web.recipients.services import (
    ids_for_external_ids,
    require_valid,
    upsert_recipients,
    validate_profile,
)
from whistle_web.tenancy import require_organization_id

IDEMPOTENCY_WINDOW = timedelta(hours=24)
MAX_INLINE_RECIPIENTS = 10_000


def published_template(
    key: str, *, field_name: str = "template"
) -> tuple[Template, TemplateVersion]:
    """The template with this key and its published version.

    Raises:
        ValidationError: no such template, or it was never published.
    """
    row = db.session.execute(
        select(Template, TemplateVersion)
        .outerjoin(TemplateVersion, TemplateVersion.id == Template.published_version_id)
        .where(Template.key == key)
    ).first()
    if row is None:
        raise ValidationError.single(field_name, f"No template with key {key!r}.")
    template, version = row
    if version is None:
        raise ValidationError.single(field_name, f"Template {key!r} has no published version.")
    return template, version


def check_channels(channels: list[str] | None, version: TemplateVersion) -> list[str] | None:
    """Validate a channel override against what the template can render.

    Raises:
        ValidationError: an unknown channel, or one the template has no content for.
    """
    if channels is None:
        return None
    errors = []
    for i, channel in enumerate(channels):
        if channel not in Channel.__members__.values():
            errors.append(FieldError(f"channels[{i}]", f"Unknown channel {channel!r}."))
        elif channel != Channel.WEBHOOK and channel not in version.content:
            errors.append(FieldError(f"channels[{i}]", f"The template has no {channel} content."))
    if not channels:
        errors.append(FieldError("channels", "Name at least one channel."))
    require_valid(errors)
    return list(dict.fromkeys(channels))


def _resolve_to(to: list[str | dict[str, Any]]) -> list[int]:
    if len(to) > MAX_INLINE_RECIPIENTS:
        raise ValidationError.single(
            "to", f"At most {MAX_INLINE_RECIPIENTS} recipients; use a topic or segment."
        )
    errors: list[FieldError] = []
    profiles = []
    external_ids: list[str] = []
    for i, item in enumerate(to):
        if isinstance(item, str):
            external_ids.append(item)
        elif isinstance(item, dict):
            errors += validate_profile(item, f"to[{i}].")
            profiles.append(item)
        else:
            errors.append(FieldError(f"to[{i}]", "An external id or a recipient object."))
    require_valid(errors)
    ids = upsert_recipients(profiles) if profiles else {}
    known = ids_for_external_ids([e for e in external_ids if e not in ids])
    ids.update(known)
    missing = [
        FieldError(f"to[{i}]", f"No recipient {item!r}; send a profile object to create one.")
        for i, item in enumerate(to)
        if isinstance(item, str) and item not in ids
    ]
    require_valid(missing)
    ordered = [ids[item if isinstance(item, str) else item["external_id"]] for item in to]
    return sorted(set(ordered))


def trigger(
    template_key: str,
    *,
    to: list[str | dict[str, Any]] | None = None,
    topic: str | None = None,
    segment_id: int | None = None,
    data: dict[str, Any] | None = None,
    channels: list[str] | None = None,
    send_at: datetime | None = None,
    local_time: time | None = None,
    idempotency_key: str | None = None,
    actor: Actor,
) -> SendRequest:
    """Ask for a template to be sent to recipients, a topic or a segment.

    The same ``idempotency_key`` within 24 hours returns the first send request and sends
    nothing again. Commits, then enqueues planning when the send is due.

    Raises:
        ValidationError: bad template, audience, channels or recipients (field paths given).
    """
    require_organization_id()
    now = datetime.now(UTC)
    if idempotency_key:
        existing = _idempotent_match(idempotency_key, now)
        if existing is not None:
            return existing
    audiences = [a for a in (to, topic, segment_id) if a not in (None, [])]
    if len(audiences) != 1:
        raise ValidationError.single("to", "Give exactly one of to, topic or segment.")
    template, version = published_template(template_key)
    channels = check_channels(channels, version)
    if to:
        audience: dict[str, Any] = {"type": "recipients", "ids": _resolve_to(to)}
    elif topic is not None:
        topic_row = db.session.scalar(select(Topic).where(Topic.key == topic))
        if topic_row is None:
            raise ValidationError.single("topic", f"No topic with key {topic!r}.")
        audience = {"type": "topic", "id": topic_row.id}
    else:
        if db.session.get(Segment, segment_id) is None:
            raise ValidationError.single("segment", f"No segment {segment_id}.")
        audience = {"type": "segment", "id": segment_id}
    if send_at is not None and send_at.tzinfo is None:
        raise ValidationError.single("send_at", "Give a time zone (RFC 3339, e.g. ...Z).")
    request = SendRequest(
        kind=SendRequestKind.TRIGGER,
        template_id=template.id,
        template_version_id=version.id,
        audience=audience,
        data=data or {},
        channels=channels,
        idempotency_key=idempotency_key or None,
        send_at=send_at or now,
        local_send_time=local_time,
        # Topics and segments are bounded by the recipients that exist now; a list of ids
        # needs no bound.
        max_recipient_id=None if audience["type"] == "recipients" else _max_recipient_id(),
        actor=actor.label,
    )
    due = request.send_at <= now
    db.session.add(request)
    session = db.session()
    try:
        # Nothing else changes this row before the answer is written: keep its loaded
        # values instead of reading it back after the commit.
        session.expire_on_commit = False
        session.commit()
    except IntegrityError:
        # Another request with the same idempotency key won the race: return its result.
        db.session.rollback()
        existing = _idempotent_match(idempotency_key or "", now)
        if existing is None:
            raise
        return existing
    finally:
        session.expire_on_commit = True
    if due:
        from workers.sending import enqueue_planning

        enqueue_planning(request)
    return request


def _idempotent_match(key: str, now: datetime) -> SendRequest | None:
    existing = db.session.scalar(select(SendRequest).where(SendRequest.idempotency_key == key))
    if existing is None:
        return None
    if existing.created_at >= now - IDEMPOTENCY_WINDOW:
        return existing
    # The key expired: free it for this new request.
    existing.idempotency_key = None
    db.session.flush()
    return None


def _max_recipient_id() -> int:
    return db.session.scalar(select(func.coalesce(func.max(Recipient.id), 0)))


def cancel_send_request(send_request_id: int, *, actor: Actor) -> int:
    """Cancel whatever of a send request is not yet sent. Commits.

    Returns:
        How many deliveries were cancelled.

    Raises:
        NotFound: no such send request in this organization.
    """
    request = db.session.get(SendRequest, send_request_id)
    if request is None:
        raise NotFound("Send request not found.")
    if request.status != SendRequestStatus.CANCELLED:
        request.status = SendRequestStatus.CANCELLED
        request.cancelled_at = datetime.now(UTC)
    notifications = select(Notification.id).where(Notification.send_request_id == request.id)
    count = cancel_queued_deliveries(Delivery.notification_id.in_(notifications))
    record_audit(actor, "send_request.cancelled", "send_request", request.id, {"cancelled": count})
    db.session.commit()
    return count


def cancel_notification(notification_id: int, *, actor: Actor) -> int:
    """Cancel the deliveries of one notification that are not yet sent. Commits.

    Raises:
        NotFound: no such notification in this organization.
        InvalidState: everything was already sent.
    """
    notification = db.session.get(Notification, notification_id)
    if notification is None:
        raise NotFound("Notification not found.")
    count = cancel_queued_deliveries(Delivery.notification_id == notification.id)
    if count == 0:
        db.session.rollback()
        raise InvalidState("Nothing left to cancel: every delivery was already sent or settled.")
    record_audit(
        actor, "notification.cancelled", "notification", notification.id, {"cancelled": count}
    )
    db.session.commit()
    return count


def cancel_queued_deliveries(*where: Any) -> int:
    """Move matching queued deliveries to cancelled and count them in the funnels."""
    now = datetime.now(UTC)
    rows = db.session.execute(
        update(Delivery)
        .where(*where, Delivery.status == DeliveryStatus.QUEUED)
        .values(status=DeliveryStatus.CANCELLED)
        .returning(Delivery.campaign_id, Delivery.template_id, Delivery.channel)
        .execution_options(synchronize_session=False)
    ).all()
    bump_counters(CounterRow(c, t, ch, "cancelled", now) for c, t, ch in rows)
    return len(rows)
