"""Triggering notifications: the entry point for the API, the console and the scheduler.

Nothing is sent here. A trigger writes one send request and enqueues one planning job
after the commit; the planner and channel workers do the rest (DESIGN.md "The send path").
Under load, the triggers of concurrent requests are written by one statement and enqueued
by one Redis round trip (`whistle_web.group_commit`), each request answered with its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import Connection, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import make_transient_to_detached

from whistle_web.audiences.models import Segment, Topic
from whistle_web.channels.kinds import Channel
from whistle_web.connections import autocommit, can_autocommit
from whistle_web.deliveries.ledger import CounterRow, bump_counters
from whistle_web.deliveries.models import Delivery
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.errors import Actor, FieldError, InvalidState, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.group_commit import GroupCommit
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

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class _Written:
    """What the trigger statement found for one send request, and the row it inserted:
    (id, status, audience, max_recipient_id, created_at), or None when it refused."""

    found: _Lookup
    row: tuple[Any, ...] | None
    # Another send request holds the idempotency key (then nothing was inserted).
    taken: bool = False


class _KeyTaken(Exception):
    """The idempotency key is held by another send request (the statement inserted none)."""


# Triggers are written by one statement, for one send request or for several at once (see
# `_group`): it reads each one's template and listed recipients and, when they check out,
# inserts the send request, returning both what it found (to explain a refusal) and the new
# row. Each input row carries its own organization, bound explicitly (plain SQL is not seen
# by the tenancy session event: every join below is on the row's `org`), and none of the
# ORM's per-statement work runs on the API's busiest path. The conditions of `accepted` are
# the ones `_refusal` reports in words; a send request already holding the row's
# idempotency key (`taken`) stops the insert too, and the caller returns it (within the
# window) or frees the key and tries again (`_idempotent_match`). Ids are drawn in
# `accepted` so that each inserted row is matched to its input row by id, whatever order
# the INSERT returns them in.
_TRIGGER_SQL = """
WITH input AS (
    SELECT * FROM jsonb_to_recordset(%(rows)s::jsonb) AS x(
        n int, org bigint, kind text, key text, external_ids text[], ids bigint[],
        audience jsonb, data jsonb, channels text[], idempotency_key text,
        request_hash text, send_at timestamptz, local_send_time time, bounded boolean,
        actor text)
), found AS (
    SELECT x.n, t.template_id, t.version_id, t.content,
           (SELECT jsonb_object_agg(r.external_id, r.id) FROM recipients r
            WHERE r.organization_id = x.org AND r.external_id = ANY(x.external_ids)) AS listed
    FROM input x
    -- LATERAL ... LIMIT 1 (keys are unique): an index lookup per input row. As a join, the
    -- planner, which guesses 100 input rows, may hash the whole templates table instead.
    LEFT JOIN LATERAL (
        SELECT t.id AS template_id, t.published_version_id AS version_id,
               ARRAY(SELECT jsonb_object_keys(v.content) FROM template_versions v
                     WHERE v.organization_id = x.org AND v.id = t.published_version_id)
                   AS content
        FROM templates t
        WHERE t.organization_id = x.org AND t.key = x.key
        LIMIT 1
    ) t ON true
), taken AS (
    SELECT x.n
    FROM input x
    CROSS JOIN LATERAL (
        SELECT FROM send_requests s
        WHERE s.organization_id = x.org AND s.idempotency_key = x.idempotency_key
        LIMIT 1
    ) s
), accepted AS (
    SELECT x.n, nextval(pg_get_serial_sequence('send_requests', 'id')) AS id
    FROM input x JOIN found f ON f.n = x.n
    WHERE NOT EXISTS (SELECT FROM taken k WHERE k.n = x.n)
      AND f.version_id IS NOT NULL
      AND (x.channels IS NULL OR x.channels <@ (f.content || '{webhook}'::text[]))
      AND (SELECT count(*) FROM jsonb_object_keys(coalesce(f.listed, '{}'::jsonb)))
          = cardinality(x.external_ids)
), inserted AS (
    INSERT INTO send_requests (id, organization_id, kind, template_id, template_version_id,
        audience, data, channels, idempotency_key, request_hash, send_at, local_send_time,
        max_recipient_id, actor)
    SELECT a.id, x.org, x.kind, f.template_id, f.version_id,
        coalesce(x.audience, jsonb_build_object('type', 'recipients', 'ids',
            (SELECT coalesce(jsonb_agg(u.id ORDER BY u.id), '[]'::jsonb) FROM (
                SELECT value::bigint AS id FROM jsonb_each_text(f.listed)
                UNION SELECT unnest(x.ids)) AS u))),
        x.data, x.channels, x.idempotency_key, x.request_hash, x.send_at, x.local_send_time,
        -- The organization's newest recipient, read backwards off the (organization_id,
        -- id) index from (org, max). max(r.id) WHERE organization_id = x.org is planned as a
        -- backward walk of the primary key until a row of the organization turns up: 250 ms
        -- over 2,000,000 recipients for a small organization whose recipients are old.
        CASE WHEN x.bounded THEN coalesce((
            SELECT CASE WHEN r.organization_id = x.org THEN r.id END FROM recipients r
            WHERE (r.organization_id, r.id) <= (x.org, 9223372036854775807)
            ORDER BY r.organization_id DESC, r.id DESC LIMIT 1), 0) END,
        x.actor
    FROM accepted a JOIN input x ON x.n = a.n JOIN found f ON f.n = a.n
    ORDER BY a.id
    RETURNING id, status, audience, max_recipient_id, created_at
)
SELECT f.n, f.template_id, f.version_id, f.content, f.listed,
       i.id, i.status, i.audience, i.max_recipient_id, i.created_at, k.n IS NOT NULL
FROM found f
LEFT JOIN accepted a ON a.n = f.n
LEFT JOIN inserted i ON i.id = a.id
LEFT JOIN taken k ON k.n = f.n
ORDER BY f.n
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


def _write(conn: Connection, rows: list[dict[str, Any]]) -> list[_Written]:
    """Run the trigger statement over ``rows`` (see `_statement_row`), in their order."""
    payload = json.dumps([dict(row, n=n) for n, row in enumerate(rows)])
    return [
        _Written(
            _Lookup(r[1], r[2], frozenset(r[3] or ()), r[4] or {}),
            tuple(r[5:10]) if r[5] is not None else None,
            r[10],
        )
        for r in conn.exec_driver_sql(_TRIGGER_SQL, {"rows": payload})
    ]


@dataclass(frozen=True)
class _Pending:
    row: dict[str, Any]  # the statement's input
    due: bool  # enqueue its planning once written


def _write_group(items: list[_Pending]) -> list[_Written | BaseException]:
    """Write the send requests of concurrent triggers with one statement in autocommit (no
    BEGIN or COMMIT round trips) and enqueue the due ones' planning in one Redis round trip.

    The statement is atomic: should it fail, each trigger is written alone, so that one bad
    row fails only its own request.
    """
    with autocommit(db.engine) as conn:
        try:
            outcomes = list(_write(conn, [item.row for item in items]))
        except DBAPIError:
            if len(items) == 1:
                raise
            outcomes = [_write_alone(conn, item.row) for item in items]
    due = [
        (written.row[0], item.row["org"], _small(item.row))
        for item, written in zip(items, outcomes, strict=True)
        if item.due and isinstance(written, _Written) and written.row is not None
    ]
    # Small triggers are planned (and sent) by one job for the group; a larger one by a job
    # of its own, which another worker can take at once instead of the small ones waiting.
    _enqueue_planning(
        [(request_id, org) for request_id, org, small in due if not small],
        together=[(request_id, org) for request_id, org, small in due if small],
    )
    return outcomes


def _small(row: dict[str, Any]) -> bool:
    """A trigger whose planning job sends it too (see planner.sent_when_planned)."""
    from whistle_web.deliveries.planner import sent_when_planned

    return sent_when_planned(row["audience"], len(row["external_ids"]) + len(row["ids"]))


def _write_alone(conn: Connection, row: dict[str, Any]) -> _Written | BaseException:
    try:
        return _write(conn, [row])[0]
    except DBAPIError as error:
        return error


def _enqueue_planning(
    requests: list[tuple[int, int]], *, together: list[tuple[int, int]] | None = None
) -> None:
    """Enqueue the planning of written send requests, given as (id, organization id):
    a job each, and one for those ``together`` (see `workers.sending.enqueue_plannings`).

    A written send request is accepted: should Redis fail here, the request is still
    answered, and the sweeper enqueues its planning after its grace period
    (`start_due_send_requests`). An error instead would invite the caller to send again.
    """
    from workers.sending import enqueue_plannings

    together = together or []
    if not requests and not together:
        return
    try:
        enqueue_plannings(requests, kind=SendRequestKind.TRIGGER, together=together)
    except RedisError:
        log.exception(
            "could not enqueue the planning of send requests %s; the sweeper will",
            [request_id for request_id, _ in [*requests, *together]],
        )


def _group() -> GroupCommit[_Pending, _Written]:
    """This application's trigger group (the pool and Redis client it uses are its own)."""
    group = current_app.extensions.get("whistle.trigger_group")
    if group is None:
        group = current_app.extensions["whistle.trigger_group"] = GroupCommit(_write_group)
    return group


def _statement_row(
    org: int, template_key: str, external_ids: list[str], values: dict[str, Any]
) -> dict[str, Any]:
    """One input row of the trigger statement, from the send request's ``values``
    (``audience`` None means "the listed recipients", plus ``ids``: recipients created
    from profiles just before)."""
    local_time = values["local_send_time"]
    return dict(
        values,
        org=org,
        key=template_key,
        external_ids=sorted(set(external_ids)),
        send_at=values["send_at"].isoformat(),
        local_send_time=local_time.isoformat() if local_time is not None else None,
    )


def _as_send_request(row: dict[str, Any], values: dict[str, Any], written: _Written) -> SendRequest:
    """The inserted row as a persistent object of the session (as if it had been flushed)."""
    assert written.row is not None
    request_id, status, audience, max_recipient_id, created_at = written.row
    request = SendRequest(
        id=request_id,
        organization_id=row["org"],
        kind=SendRequestKind(values["kind"]),
        status=SendRequestStatus(status),
        template_id=written.found.template_id,
        template_version_id=written.found.version_id,
        audience=audience,
        data=values["data"],
        channels=values["channels"],
        idempotency_key=values["idempotency_key"],
        request_hash=values["request_hash"],
        send_at=values["send_at"],
        local_send_time=values["local_send_time"],
        max_recipient_id=max_recipient_id,
        actor=values["actor"],
        created_at=created_at,
        **_FRESH,
    )
    make_transient_to_detached(request)
    db.session.add(request)
    return request


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
    request_hash: str | None = None,
    actor: Actor,
) -> SendRequest:
    """Ask for a template to be sent to recipients, a topic or a segment.

    The same ``idempotency_key`` within 24 hours returns the first send request (its
    ``replayed`` is True) and sends nothing again; ``request_hash`` is kept with the key
    (the API's fingerprint of the request) for the caller to compare on a replay. Commits,
    then enqueues planning when the send is due.

    Raises:
        ValidationError: bad template, audience, channels or recipients (field paths given).
    """
    org = require_organization_id()
    now = datetime.now(UTC)
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
        "request_hash": request_hash if idempotency_key else None,
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
            row = _statement_row(org, template_key, external_ids, values)
            due = values["send_at"] <= now
            # Outside a transaction the statement commits by itself, grouped with other
            # requests' triggers, and the group enqueues their planning; inside one the
            # caller's commit covers it, and planning is enqueued after that commit.
            grouped = can_autocommit(session)
            if grouped:
                written = _group().submit(_Pending(row, due))
            else:
                (written,) = _write(session.connection(), [row])
            if written.taken:  # rolls the profiles' savepoint back
                raise _KeyTaken
            if written.row is None:
                raise _refusal(template_key, written.found, requested, to)
            request = _as_send_request(row, values, written)
        if not grouped:
            # Nothing else changes this row before the answer is written: keep its loaded
            # values instead of reading it back after the commit.
            session.expire_on_commit = False
            session.commit()
    except _KeyTaken:
        # The key is held: by the first send request made with it (returned), or by one
        # whose window passed (`_idempotent_match` frees the key, and the trigger is asked
        # again).
        existing = _idempotent_match(idempotency_key or "", now)
        if existing is None:
            db.session.commit()
            return trigger(
                template_key,
                to=to,
                topic=topic,
                segment_id=segment_id,
                data=data,
                channels=requested,
                send_at=send_at,
                local_time=local_time,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                actor=actor,
            )
        existing.replayed = True
        return existing
    except IntegrityError:
        # Another request with the same idempotency key won the race: return its result.
        db.session.rollback()
        existing = _idempotent_match(idempotency_key or "", now)
        if existing is None:
            raise
        existing.replayed = True
        return existing
    finally:
        session.expire_on_commit = True
    if due and not grouped:
        _enqueue_planning([(request.id, org)])
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
