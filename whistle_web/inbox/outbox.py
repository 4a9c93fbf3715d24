"""Publish inbox state changes on the recipient's Redis channel once their transaction commits.

The ledger calls :func:`note_state_change` whenever an in-app delivery's ``seen_at``,
``read_at``, ``clicked_at`` or ``archived_at`` changes, whoever changed it (the socket, the
HTTP feed, ``POST /api/v1/events``). The delivery gets a new inbox sequence number at once;
just before the commit the frames are built (an ``updated`` frame per delivery and one
``unread_count`` per recipient, counted inside the transaction so it includes the change),
and after the commit they are published, so no tab ever hears of a change that was rolled
back. Redis may be down: the change is in PostgreSQL and reaches the widget on its next
resume or fetch.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import redis
from flask import has_app_context
from flask_sqlalchemy.session import Session as FlaskSession
from sqlalchemy import event, func, literal_column, select

from whistle_web.channels.base import Message
from whistle_web.channels.in_app import inbox_channel
from whistle_web.deliveries.models import INBOX_SEQ, Delivery
from whistle_web.extensions import db
from whistle_web.tenancy import organization_scope

log = logging.getLogger(__name__)

_CHANGED = "whistle_inbox_changed"
_OUTBOX = "whistle_inbox_outbox"
STATE_FIELDS = ("seen_at", "read_at", "archived_at", "clicked_at")


def next_seq() -> int:
    """Draw one inbox sequence number."""
    return int(db.session.scalar(select(INBOX_SEQ.next_value())))


def draw_inbox_seqs(messages: Sequence[Message]) -> None:
    """Put a fresh sequence number in each in-app message's ``meta["seq"]`` (one statement)."""
    if not messages:
        return
    seqs = db.session.scalars(
        select(INBOX_SEQ.next_value()).select_from(func.generate_series(1, len(messages)))
    )
    for message, seq in zip(messages, seqs, strict=True):
        message.meta["seq"] = seq


def note_state_change(delivery: Delivery) -> None:
    """Give an in-app delivery a new sequence number and announce it after the commit."""
    delivery.inbox_seq = next_seq()
    db.session.info.setdefault(_CHANGED, {})[delivery.id] = delivery


def rfc3339(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def updated_frame(delivery: Delivery) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "updated", "seq": delivery.inbox_seq, "id": delivery.id}
    for name in STATE_FIELDS:
        frame[name] = rfc3339(getattr(delivery, name))
    return frame


# Inline, not a bound parameter: the planner can match the partial index on
# (recipient_id, inbox_seq) WHERE channel = 'in_app' in generic plans too.
IN_APP = Delivery.channel == literal_column("'in_app'")


def unread_filter(recipient_id: int) -> tuple[Any, ...]:
    """The recipient's in-app items that count as unread (sent, not read, not archived)."""
    return (
        Delivery.recipient_id == recipient_id,
        IN_APP,
        Delivery.sent_at.is_not(None),
        Delivery.read_at.is_(None),
        Delivery.archived_at.is_(None),
    )


def count_unread(recipient_id: int) -> int:
    """Unread items of a recipient in the active organization."""
    return int(
        db.session.scalar(
            select(func.count()).select_from(Delivery).where(*unread_filter(recipient_id))
        )
        or 0
    )


def encode(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), default=str)


@event.listens_for(FlaskSession, "before_commit")
def _build_frames(session: Any) -> None:
    changed: dict[int, Delivery] = session.info.pop(_CHANGED, None) or {}
    if not changed:
        return
    by_recipient: dict[tuple[int, int], list[Delivery]] = defaultdict(list)
    for delivery in changed.values():
        if delivery.recipient_id is not None:
            by_recipient[(delivery.organization_id, delivery.recipient_id)].append(delivery)
    outbox = session.info.setdefault(_OUTBOX, [])
    for (org_id, recipient_id), deliveries in by_recipient.items():
        channel = inbox_channel(org_id, recipient_id)
        for delivery in sorted(deliveries, key=lambda d: d.inbox_seq or 0):
            outbox.append((channel, encode(updated_frame(delivery))))
        with organization_scope(org_id):
            count = count_unread(recipient_id)
        outbox.append((channel, encode({"type": "unread_count", "count": count})))


@event.listens_for(FlaskSession, "after_commit")
def _publish(session: Any) -> None:
    outbox = session.info.pop(_OUTBOX, None)
    if not outbox:
        return
    if not has_app_context():
        log.warning("inbox: %d frames not published (no application context)", len(outbox))
        return
    from whistle_web import get_redis

    try:
        pipe = get_redis().pipeline(transaction=False)
        for channel, payload in outbox:
            pipe.publish(channel, payload)
        pipe.execute()
    except redis.RedisError as error:
        log.warning("inbox: %d frames not published live: %s", len(outbox), error)


@event.listens_for(FlaskSession, "after_rollback")
def _forget(session: Any) -> None:
    session.info.pop(_CHANGED, None)
    session.info.pop(_OUTBOX, None)
