"""Triggering notifications: the entry point for the API, the console and the scheduler.

Nothing is sent here. A trigger writes one send request and enqueues one planning job
after the commit; the planner and channel workers do the rest (DESIGN.md "The send path").
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import make_transient_to_detached

from whistle_web.audiences.models import Segment, Topic
from whistle_web.channels.kinds import Channel
from whistle_web.deliveries.ledger import CounterRow, bump_counters
from whistle_web.deliveries.models import Delivery
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.errors import Actor, FieldError, InvalidState, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.message_templates.models import TemplateVersion
from whistle_web.notifications.models import (
    Notification,
    SendRequest,
    SendRequestKind,
    SendRequestStatus,
)
from whistle_web.organizations.services import record_audit
from whistle_web.recipients.models import Recipient
from whistle_web.recipients.services import (
    require_valid,
    upsert_recipients,
    validate_profile,
)
from whistle_web.tenancy import require_organization_id

IDEMPOTENCY_WINDOW = timedelta(hours=24)
MAX_INLINE_RECIPIENTS = 10_000


def check_channels(channels: list[str] | None, version: TemplateVersion) -> list[str] | None:
    """Validate a channel override against what the template can render.

    Raises:
        ValidationError: an unknown channel, or one the template has no content for.
    """
    return _check_channels(channels, version.content)


def _check_channels(channels: list[str] | None, content: Collection[str]) -> list[str] | None:
    if channels is None:
        return None
    errors = []
    for i, channel in enumerate(channels):
        if channel not in Channel.__members__.values():
            errors.append(FieldError(f"channels[{i}]", f"Unknown channel {channel!r}."))
        elif channel != Channel.WEBHOOK and channel not in content:
            errors.append(FieldError(f"channels[{i}]", f"The template has no {channel} content."))
    if not channels:
        errors.append(FieldError("channels", "Name at least one channel."))
    require_valid(errors)
    return list(dict.fromkeys(channels))


@dataclass(frozen=True)
class _Lookup:
    template_id: int | None
    version_id: int | None
    channels: frozenset[str]  # what the published version has content for
    recipients: dict[str, int]  # external id -> id, of those asked for that exist


# Every trigger reads its template and its listed recipients: one statement, with the
# organization bound explicitly (plain SQL is not seen by the tenancy session event), and
# none of the ORM's per-statement work on the API's busiest path.
_LOOKUP_SQL = """
SELECT t.id, t.published_version_id,
       ARRAY(SELECT jsonb_object_keys(v.content)),
       (SELECT jsonb_object_agg(r.external_id, r.id) FROM recipients r
         WHERE r.organization_id = %(org)s AND r.external_id = ANY(%(external_ids)s))
FROM (SELECT 1) AS one
LEFT JOIN templates t ON t.organization_id = %(org)s AND t.key = %(key)s
LEFT JOIN template_versions v
       ON v.organization_id = %(org)s AND v.id = t.published_version_id
"""


def _lookup(template_key: str, external_ids: list[str]) -> _Lookup:
    """The template, its published version's channels and the existing recipients."""
    row = (
        db.session.connection()
        .exec_driver_sql(
            _LOOKUP_SQL,
            {"org": require_organization_id(), "key": template_key, "external_ids": external_ids},
        )
        .one()
    )
    return _Lookup(row[0], row[1], frozenset(row[2] or ()), row[3] or {})


def _published(template_key: str, found: _Lookup) -> tuple[int, int]:
    """The template's id and its published version's.

    Raises:
        ValidationError: no such template, or it was never published.
    """
    if found.template_id is None:
        raise ValidationError.single("template", f"No template with key {template_key!r}.")
    if found.version_id is None:
        raise ValidationError.single(
            "template", f"Template {template_key!r} has no published version."
        )
    return found.template_id, found.version_id


_INSERT_SQL = """
INSERT INTO send_requests (organization_id, kind, template_id, template_version_id, audience,
    data, channels, idempotency_key, send_at, local_send_time, max_recipient_id, actor)
VALUES (%(organization_id)s, %(kind)s, %(template_id)s, %(template_version_id)s,
    %(audience)s::jsonb, %(data)s::jsonb, %(channels)s, %(idempotency_key)s,
    %(send_at)s, %(local_send_time)s, %(max_recipient_id)s, %(actor)s)
RETURNING *
"""


def _insert_send_request(values: dict[str, Any]) -> SendRequest:
    """INSERT a send request in one statement, without the unit of work's flush.

    Returns:
        The row as a persistent object of the session, as if it had been flushed.
    """
    params = dict(values, organization_id=require_organization_id())
    params["audience"] = json.dumps(params["audience"])
    params["data"] = json.dumps(params["data"])
    result = db.session.connection().exec_driver_sql(_INSERT_SQL, params)
    row = result.mappings().one()
    request = SendRequest(**row)
    request.kind = SendRequestKind(row["kind"])
    request.status = SendRequestStatus(row["status"])
    make_transient_to_detached(request)
    db.session.add(request)
    return request


def _resolve_to(to: list[str | dict[str, Any]], known: dict[str, int]) -> list[int]:
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
    # ``known`` was read before the upsert: an id given both ways is the upsert's.
    ids.update({e: known[e] for e in external_ids if e not in ids and e in known})
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
    listed = [item for item in to if isinstance(item, str)] if to else []
    found = _lookup(template_key, listed)
    template_id, version_id = _published(template_key, found)
    channels = _check_channels(channels, found.channels)
    if to:
        audience: dict[str, Any] = {"type": "recipients", "ids": _resolve_to(to, found.recipients)}
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
    values = {
        "kind": SendRequestKind.TRIGGER.value,
        "template_id": template_id,
        "template_version_id": version_id,
        "audience": audience,
        "data": data or {},
        "channels": channels,
        "idempotency_key": idempotency_key or None,
        "send_at": send_at or now,
        "local_send_time": local_time,
        # Topics and segments are bounded by the recipients that exist now; a list of ids
        # needs no bound.
        "max_recipient_id": None if audience["type"] == "recipients" else _max_recipient_id(),
        "actor": actor.label,
    }
    session = db.session()
    try:
        request = _insert_send_request(values)
        due = request.send_at <= now
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
