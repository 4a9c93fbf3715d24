"""The inbox of one recipient: the feed, the unread count, resume, and the widget's actions.

An inbox item is an in-app delivery that was sent. Everything here runs inside the
recipient's organization scope; actions go through :func:`record_event`, so the ledger,
``delivery_events`` and the funnel counters move exactly as for ``POST /api/v1/events``, and
every open tab hears of the change once it is committed (:mod:`whistle_web.inbox.outbox`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jwt
from flask import current_app
from sqlalchemy import bindparam, func, select

from whistle_web.api.framework import decode_cursor, encode_cursor
from whistle_web.deliveries.ledger import record_event
from whistle_web.deliveries.models import Delivery
from whistle_web.errors import NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.inbox.outbox import IN_APP, count_unread, rfc3339, unread_filter
from whistle_web.notifications.models import Notification
from whistle_web.organizations.models import Organization
from whistle_web.preferences.services import (
    InvalidRecipientToken,
    RecipientClaims,
    verify_recipient_token,
)
from whistle_web.recipients.models import Recipient
from whistle_web.tenancy import organization_scope

# Missed items sent on resume before the client is told to refetch the feed instead.
RESUME_CAP = 200
MAX_SEEN_IDS = 100
# Items marked read per transaction by "read all" (each goes through the ledger).
READ_ALL_CHUNK = 500
# Socket and HTTP action names -> ledger event types.
ACTION_EVENTS = {"seen": "seen", "read": "read", "archive": "archived", "clicked": "clicked"}
_ACTION_STAMP = {"seen": "seen_at", "read": "read_at", "archive": "archived_at"}

StatusFilter = Literal["unread", "read", "all"]


@dataclass(frozen=True)
class InboxOwner:
    """Whose inbox: a recipient of one organization."""

    organization_id: int
    recipient_id: int
    external_id: str


@dataclass(frozen=True)
class SocketAuth:
    """A verified recipient token: whose inbox it opens, and who may open it."""

    owner: InboxOwner
    claims: RecipientClaims
    allowed_origins: tuple[str, ...]


# Built once (every socket runs them); the tenant scope is added when they execute.
_SOCKET_AUTH = (
    select(Organization, Recipient.id)
    .outerjoin(
        Recipient,
        (Recipient.organization_id == Organization.id)
        & (Recipient.external_id == bindparam("external_id")),
    )
    .where(Organization.id == bindparam("organization_id"))
)
_INBOX_STATE = select(
    select(func.max(Delivery.inbox_seq))
    .where(Delivery.recipient_id == bindparam("recipient_id"), IN_APP)
    .scalar_subquery(),
    select(func.count())
    .select_from(Delivery)
    .where(*unread_filter(bindparam("recipient_id")))
    .scalar_subquery(),
)


def _unverified_subject(token: str) -> tuple[int, str] | None:
    """The (organization, external id) a token claims, before anything is checked."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    org_id, external_id = claims.get("org"), claims.get("sub")
    if not isinstance(org_id, int) or isinstance(org_id, bool) or not 0 < org_id < 2**63:
        return None
    if not isinstance(external_id, str) or not external_id or "\x00" in external_id:
        return None
    return org_id, external_id


def open_socket(token: str) -> SocketAuth:
    """Verify a recipient token and resolve its inbox, in one query.

    The organization (its widget secret and allowed origins) and the recipient are read
    together, keyed on what the token claims; the signature is then checked with that
    organization's secret, found in the session without a second query. Nothing read is
    used unless the token verifies.

    Raises:
        InvalidRecipientToken: malformed, forged or expired, or its recipient does not exist.
    """
    if not isinstance(token, str) or not token or len(token) > 4096:
        raise InvalidRecipientToken("The recipient token is not valid.")
    claimed = _unverified_subject(token)
    organization = recipient_id = None
    if claimed is not None:
        org_id, external_id = claimed
        with organization_scope(org_id):
            row = db.session.execute(
                _SOCKET_AUTH, {"organization_id": org_id, "external_id": external_id}
            ).first()
        if row is not None:
            # Held here, so verify_recipient_token's session.get finds it in the session.
            organization, recipient_id = row
    claims = verify_recipient_token(token)
    if "\x00" in claims.external_id:  # signed, but names nothing PostgreSQL can store
        raise InvalidRecipientToken("The recipient token names no recipient.")
    if organization is None or claimed != (claims.organization_id, claims.external_id):
        raise InvalidRecipientToken("The recipient token is not valid.")
    if recipient_id is None:
        raise InvalidRecipientToken("The recipient token names no recipient.")
    return SocketAuth(
        InboxOwner(claims.organization_id, recipient_id, claims.external_id),
        claims,
        tuple(organization.allowed_origins or ()),
    )


def authenticate(token: str) -> tuple[InboxOwner, RecipientClaims]:
    """Resolve a recipient token to the inbox it opens.

    Raises:
        InvalidRecipientToken: malformed, forged or expired, or its recipient does not exist.
    """
    opened = open_socket(token)
    return opened.owner, opened.claims


def preferences_url(owner: InboxOwner) -> str:
    """The signed link to the recipient's hosted preference page."""
    from whistle_web.tracking import links

    return links.preferences_url(
        current_app.config["WHISTLE_BASE_URL"],
        current_app.config["SECRET_KEY"],
        owner.organization_id,
        owner.recipient_id,
    )


def _items(owner: InboxOwner) -> Any:
    return (
        select(
            Delivery.id,
            Delivery.inbox_seq,
            Delivery.notification_id,
            Delivery.rendered,
            Notification.data,
            Delivery.created_at,
            Delivery.seen_at,
            Delivery.read_at,
            Delivery.archived_at,
            Delivery.clicked_at,
        )
        .join(Notification, Notification.id == Delivery.notification_id)
        .where(
            Delivery.recipient_id == owner.recipient_id,
            IN_APP,
            Delivery.sent_at.is_not(None),
        )
    )


def item(row: Any) -> dict[str, Any]:
    """An inbox item in the protocol's shape (the ``notification`` frame without ``type``)."""
    content = row.rendered or {}
    return {
        "seq": row.inbox_seq,
        "id": row.id,
        "notification_id": row.notification_id,
        "title": content.get("title", ""),
        "body": content.get("body", ""),
        "action_url": content.get("action_url") or None,
        "data": row.data or {},
        "created_at": rfc3339(row.created_at),
        "seen_at": rfc3339(row.seen_at),
        "read_at": rfc3339(row.read_at),
        "archived_at": rfc3339(row.archived_at),
        "clicked_at": rfc3339(row.clicked_at),
    }


def notification_frame(row: Any) -> dict[str, Any]:
    return {"type": "notification", **item(row)}


def unread_count(owner: InboxOwner) -> int:
    with organization_scope(owner.organization_id):
        return count_unread(owner.recipient_id)


def inbox_state(owner: InboxOwner) -> tuple[int, int]:
    """The recipient's highest sequence number and unread count, in one query."""
    with organization_scope(owner.organization_id):
        latest, count = db.session.execute(_INBOX_STATE, {"recipient_id": owner.recipient_id}).one()
    return int(latest or 0), int(count or 0)


def latest_seq(owner: InboxOwner) -> int:
    """The recipient's highest sequence number (0 before the first item)."""
    with organization_scope(owner.organization_id):
        seq = db.session.scalar(
            select(func.max(Delivery.inbox_seq)).where(
                Delivery.recipient_id == owner.recipient_id, IN_APP
            )
        )
    return int(seq or 0)


def feed(
    owner: InboxOwner,
    *,
    limit: int = 20,
    cursor: str | None = None,
    status: StatusFilter = "all",
    archived: bool = False,
) -> dict[str, Any]:
    """One page of the inbox, newest first, with the unread count and latest seq.

    Raises:
        ValidationError: a cursor this API did not return.
    """
    after = decode_cursor(cursor)
    with organization_scope(owner.organization_id):
        stmt = _items(owner)
        if status == "unread":
            stmt = stmt.where(Delivery.read_at.is_(None))
        elif status == "read":
            stmt = stmt.where(Delivery.read_at.is_not(None))
        stmt = stmt.where(
            Delivery.archived_at.is_not(None) if archived else Delivery.archived_at.is_(None)
        )
        if after is not None:
            stmt = stmt.where(Delivery.id < after)
        rows = db.session.execute(stmt.order_by(Delivery.id.desc()).limit(limit + 1)).all()
        more = len(rows) > limit
        rows = rows[:limit]
    seq, count = inbox_state(owner)
    return {
        "items": [item(r) for r in rows],
        "next_cursor": encode_cursor(rows[-1].id) if more and rows else None,
        "unread_count": count,
        "seq": seq,
    }


def resume(owner: InboxOwner, last_seq: int) -> list[dict[str, Any]] | None:
    """Items changed or added after ``last_seq``, oldest first, as ``notification`` frames.

    Returns:
        None when more than :data:`RESUME_CAP` were missed (the client refetches the feed).
    """
    with organization_scope(owner.organization_id):
        rows = db.session.execute(
            _items(owner)
            .where(Delivery.inbox_seq > last_seq)
            .order_by(Delivery.inbox_seq)
            .limit(RESUME_CAP + 1)
        ).all()
    if len(rows) > RESUME_CAP:
        return None
    return [notification_frame(r) for r in rows]


def _check_ids(owner: InboxOwner, ids: list[int]) -> list[Any]:
    """The recipient's inbox items with these ids, in the order given.

    Raises:
        NotFound: one id is not an item of this recipient's inbox.
    """
    wanted = list(dict.fromkeys(ids))
    rows = {r.id: r for r in db.session.execute(_items(owner).where(Delivery.id.in_(wanted))).all()}
    missing = [i for i in wanted if i not in rows]
    if missing:
        raise NotFound(f"No inbox item {missing[0]}.")
    return [rows[i] for i in wanted]


def check_ids(value: Any, *, field: str = "ids", many: bool = True) -> list[int]:
    """Validate ids from a client frame or body.

    Raises:
        ValidationError: not a (list of) positive integer id(s), or too many.
    """
    values = value if many else [value]
    if not isinstance(values, list) or not values:
        raise ValidationError.single(
            field, "Give a non-empty list of ids." if many else "Give an id."
        )
    if len(values) > MAX_SEEN_IDS:
        raise ValidationError.single(field, f"At most {MAX_SEEN_IDS} ids at a time.")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2**63:
            raise ValidationError.single(field, "Ids are positive integers.")
    return values


def act(owner: InboxOwner, action: str, ids: list[int]) -> list[dict[str, Any]]:
    """Mark items seen, read, archived or clicked. Commits.

    An item already in that state is left alone (no event, nothing counted twice).

    Returns:
        The items after the change, in the order given.

    Raises:
        NotFound: an id is not an item of this recipient's inbox (nothing is changed).
    """
    event_type = ACTION_EVENTS[action]
    stamp = _ACTION_STAMP.get(action)
    with organization_scope(owner.organization_id):
        rows = _check_ids(owner, ids)
        # Locked in id order, so two tabs acting on the same items never deadlock.
        for row in sorted(rows, key=lambda r: r.id):
            if stamp is None or getattr(row, stamp) is None:
                record_event(row.id, event_type, data={"source": "inbox"})
        db.session.commit()
        return [item(r) for r in _check_ids(owner, ids)]


def read_all(owner: InboxOwner) -> int:
    """Mark every unread item read, through the ledger. Commits (per chunk).

    Returns:
        How many items were marked read.
    """
    done = last_id = 0
    with organization_scope(owner.organization_id):
        while True:
            ids = list(
                db.session.scalars(
                    select(Delivery.id)
                    .where(
                        Delivery.recipient_id == owner.recipient_id,
                        IN_APP,
                        Delivery.sent_at.is_not(None),
                        Delivery.read_at.is_(None),
                        Delivery.id > last_id,
                    )
                    .order_by(Delivery.id)
                    .limit(READ_ALL_CHUNK)
                )
            )
            if not ids:
                return done
            for delivery_id in ids:
                record_event(delivery_id, "read", data={"source": "inbox"})
            db.session.commit()
            done += len(ids)
            last_id = ids[-1]
