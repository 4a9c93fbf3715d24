"""Triggering notifications: the entry point for the API, the console and the scheduler.

Nothing is sent here. A trigger writes one send request and enqueues one planning job
after the commit; the planner and channel workers do the rest (DESIGN.md "The send path").
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, select, update
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
    checked = _check_channel_names(channels)
    _check_content(channels, version.content)  # field paths index the list as given
    return checked


def _check_channel_names(channels: list[str] | None) -> list[str] | None:
    """The override without repeats.

    Raises:
        ValidationError: an unknown channel, or an empty list.
    """
    if channels is None:
        return None
    errors = [
        FieldError(f"channels[{i}]", f"Unknown channel {channel!r}.")
        for i, channel in enumerate(channels)
        if channel not in Channel.__members__.values()
    ]
    if not channels:
        errors.append(FieldError("channels", "Name at least one channel."))
    require_valid(errors)
    return list(dict.fromkeys(channels))


def _check_content(channels: list[str] | None, content: Collection[str]) -> None:
    """Raises ValidationError for a channel the template has no content for (webhooks
    need none: they carry the data)."""
    require_valid(
        [
            FieldError(f"channels[{i}]", f"The template has no {channel} content.")
            for i, channel in enumerate(channels or [])
            if channel != Channel.WEBHOOK and channel not in content
        ]
    )


@dataclass(frozen=True)
class _Lookup:
    template_id: int | None
    version_id: int | None
    channels: frozenset[str]  # what the published version has content for
    recipients: dict[str, int]  # external id -> id, of those asked for that exist


# A trigger is one statement: it reads the template and the listed recipients and, when
# they check out, inserts the send request, returning both what it found (to explain a
# refusal) and the new row. The organization is bound explicitly (plain SQL is not seen by
# the tenancy session event), and none of the ORM's per-statement work runs on the API's
# busiest path. The conditions of the INSERT are the ones `_refusal` reports in words.
_TRIGGER_SQL = """
WITH template AS (
    SELECT t.id, t.published_version_id,
           ARRAY(SELECT jsonb_object_keys(v.content)) AS channels
    FROM templates t
    LEFT JOIN template_versions v
           ON v.organization_id = %(org)s AND v.id = t.published_version_id
    WHERE t.organization_id = %(org)s AND t.key = %(key)s
), listed AS (
    SELECT r.external_id, r.id FROM recipients r
    WHERE r.organization_id = %(org)s AND r.external_id = ANY(%(external_ids)s)
), inserted AS (
    INSERT INTO send_requests (organization_id, kind, template_id, template_version_id,
        audience, data, channels, idempotency_key, send_at, local_send_time,
        max_recipient_id, actor)
    SELECT %(org)s, %(kind)s, t.id, t.published_version_id,
        coalesce(%(audience)s::jsonb, jsonb_build_object('type', 'recipients', 'ids',
            (SELECT coalesce(jsonb_agg(u.id ORDER BY u.id), '[]'::jsonb) FROM (
                SELECT id FROM listed UNION SELECT unnest(%(ids)s::bigint[])) AS u))),
        %(data)s::jsonb, %(channels)s, %(idempotency_key)s, %(send_at)s,
        %(local_send_time)s,
        CASE WHEN %(bounded)s THEN (SELECT coalesce(max(r.id), 0) FROM recipients r
                                    WHERE r.organization_id = %(org)s) END,
        %(actor)s
    FROM template t
    WHERE t.published_version_id IS NOT NULL
      AND (%(channels)s::text[] IS NULL
           OR %(channels)s::text[] <@ (t.channels || '{webhook}'::text[]))
      AND (SELECT count(*) FROM listed) = %(listed)s
    RETURNING id, status, audience, max_recipient_id, created_at
)
SELECT t.id, t.published_version_id, t.channels,
       (SELECT jsonb_object_agg(l.external_id, l.id) FROM listed l),
       i.id, i.status, i.audience, i.max_recipient_id, i.created_at
FROM (SELECT 1) AS one
LEFT JOIN template t ON true
LEFT JOIN inserted i ON true
"""
# What a new send request holds that the INSERT does not set (the columns' defaults).
_FRESH = {
    "campaign_id": None,
    "cursor_recipient_id": 0,
    "planned_count": 0,
    "error": None,
    "planned_at": None,
    "heartbeat_at": None,
    "cancelled_at": None,
}


@contextmanager
def _statement_connection() -> Iterator[tuple[Connection, bool]]:
    """Where the trigger statement runs, and whether it commits on its own.

    The statement is atomic by itself: when the session has no transaction yet, it runs
    on a connection of its own in autocommit, without BEGIN and COMMIT round trips.
    Otherwise (profiles upserted first, an idempotency key looked up, an outer transaction
    the session joined, as the tests' sessions do) it runs in the session's transaction,
    which the caller commits.
    """
    session = db.session()
    bind = session.get_bind()
    if session.in_transaction() or not isinstance(bind, Engine):
        yield session.connection(), False
        return
    with bind.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT"), True


def _insert_send_request(
    conn: Connection, template_key: str, external_ids: list[str], values: dict[str, Any]
) -> tuple[_Lookup, SendRequest | None]:
    """Look up the template and listed recipients and insert the send request if they
    check out, in one statement and without the unit of work's flush.

    ``values`` are the send request's columns; ``audience`` None means "the listed
    recipients" (plus ``ids``, recipients created from profiles just before).

    Returns:
        What was found, and the new row as a persistent object of the session (as if it
        had been flushed), or None when nothing was inserted.
    """
    listed = sorted(set(external_ids))
    params = dict(
        values,
        org=require_organization_id(),
        key=template_key,
        external_ids=listed,
        listed=len(listed),
        audience=json.dumps(values["audience"]) if values["audience"] is not None else None,
        data=json.dumps(values["data"]),
    )
    row = conn.exec_driver_sql(_TRIGGER_SQL, params).one()
    found = _Lookup(row[0], row[1], frozenset(row[2] or ()), row[3] or {})
    if row[4] is None:
        return found, None
    request = SendRequest(
        id=row[4],
        organization_id=params["org"],
        kind=SendRequestKind(values["kind"]),
        status=SendRequestStatus(row[5]),
        template_id=found.template_id,
        template_version_id=found.version_id,
        audience=row[6],
        data=values["data"],
        channels=values["channels"],
        idempotency_key=values["idempotency_key"],
        send_at=values["send_at"],
        local_send_time=values["local_send_time"],
        max_recipient_id=row[7],
        actor=values["actor"],
        created_at=row[8],
        **_FRESH,
    )
    make_transient_to_detached(request)
    db.session.add(request)
    return found, request


def _refusal(
    template_key: str,
    found: _Lookup,
    channels: list[str] | None,
    to: list[str | dict[str, Any]] | None,
) -> ValidationError:
    """Why the trigger statement inserted nothing, in the order a caller fixes things."""
    try:
        if found.template_id is None:
            raise ValidationError.single("template", f"No template with key {template_key!r}.")
        if found.version_id is None:
            raise ValidationError.single(
                "template", f"Template {template_key!r} has no published version."
            )
        _check_content(channels, found.channels)
        require_valid(
            [
                FieldError(
                    f"to[{i}]", f"No recipient {item!r}; send a profile object to create one."
                )
                for i, item in enumerate(to or [])
                if isinstance(item, str) and item not in found.recipients
            ]
        )
    except ValidationError as error:
        return error
    raise RuntimeError("the trigger statement inserted nothing, yet everything checks out")


def _split_to(to: list[str | dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The external ids and the recipient profiles of a ``to`` list.

    Raises:
        ValidationError: too many, or an item that is neither (field paths given).
    """
    if len(to) > MAX_INLINE_RECIPIENTS:
        raise ValidationError.single(
            "to", f"At most {MAX_INLINE_RECIPIENTS} recipients; use a topic or segment."
        )
    errors: list[FieldError] = []
    external_ids: list[str] = []
    profiles = []
    for i, item in enumerate(to):
        if isinstance(item, str):
            external_ids.append(item)
        elif isinstance(item, dict):
            errors += validate_profile(item, f"to[{i}].")
            profiles.append(item)
        else:
            errors.append(FieldError(f"to[{i}]", "An external id or a recipient object."))
    require_valid(errors)
    return external_ids, profiles


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
    requested, channels = channels, _check_channel_names(channels)
    if send_at is not None and send_at.tzinfo is None:
        raise ValidationError.single("send_at", "Give a time zone (RFC 3339, e.g. ...Z).")
    external_ids: list[str] = []
    profiles: list[dict[str, Any]] = []
    audience: dict[str, Any] | None = None  # None: the listed recipients
    if to:
        external_ids, profiles = _split_to(to)
    elif topic is not None:
        topic_row = db.session.scalar(select(Topic).where(Topic.key == topic))
        if topic_row is None:
            raise ValidationError.single("topic", f"No topic with key {topic!r}.")
        audience = {"type": "topic", "id": topic_row.id}
    else:
        if db.session.get(Segment, segment_id) is None:
            raise ValidationError.single("segment", f"No segment {segment_id}.")
        audience = {"type": "segment", "id": segment_id}
    values = {
        "kind": SendRequestKind.TRIGGER.value,
        "audience": audience,
        "ids": [],
        "data": data or {},
        "channels": channels,
        "idempotency_key": idempotency_key or None,
        "send_at": send_at or now,
        "local_send_time": local_time,
        # Topics and segments are bounded by the recipients that exist now; a list of ids
        # needs no bound.
        "bounded": audience is not None,
        "actor": actor.label,
    }
    session = db.session()
    try:
        # Profiles are created or updated first, in a savepoint: a refused trigger keeps
        # none of them (the caller's own work in the transaction stays).
        with session.begin_nested() if profiles else nullcontext():
            if profiles:
                values["ids"] = list(upsert_recipients(profiles).values())
            with _statement_connection() as (conn, committed):
                found, request = _insert_send_request(conn, template_key, external_ids, values)
            if request is None:
                raise _refusal(template_key, found, requested, to)
        due = request.send_at <= now
        if not committed:
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
