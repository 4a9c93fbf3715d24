"""Create and update recipients (the customer's end users)."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Sequence
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import delete, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert

from whistle_web.errors import Actor, FieldError, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.organizations.services import record_audit
from whistle_web.recipients.models import Recipient
from whistle_web.tenancy import require_organization_id, unscoped

PROFILE_FIELDS = ("email", "phone", "name", "locale", "timezone")
E164 = re.compile(r"^\+[1-9]\d{6,14}$")
EXTERNAL_ID = re.compile(r"^[^\s].{0,254}$")


def validate_profile(profile: dict[str, Any], path: str = "") -> list[FieldError]:
    """Check one inline recipient profile; field paths are prefixed with ``path``."""
    errors = []
    external_id = profile.get("external_id")
    if not isinstance(external_id, str) or not EXTERNAL_ID.match(external_id):
        errors.append(FieldError(f"{path}external_id", "A non-empty id of at most 255 characters."))
    email = profile.get("email")
    if email is not None and (not isinstance(email, str) or "@" not in email or len(email) > 320):
        errors.append(FieldError(f"{path}email", "Not an email address."))
    phone = profile.get("phone")
    if phone is not None and (not isinstance(phone, str) or not E164.match(phone)):
        errors.append(FieldError(f"{path}phone", "Use E.164 format, e.g. +14155550100."))
    timezone = profile.get("timezone")
    if timezone is not None:
        try:
            ZoneInfo(str(timezone))
        except (ZoneInfoNotFoundError, ValueError):
            errors.append(
                FieldError(f"{path}timezone", "Not an IANA time zone, e.g. Europe/Berlin.")
            )
    attributes = profile.get("attributes")
    if attributes is not None and not isinstance(attributes, dict):
        errors.append(FieldError(f"{path}attributes", "Expected an object."))
    return errors


def upsert_recipients(profiles: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Create or update recipients by external id; attributes are merged, not replaced.

    Only the fields present in a profile change. Flushes, does not commit.

    Returns:
        external_id -> recipient id, for every profile.
    """
    org_id = require_organization_id()
    ids: dict[str, int] = {}
    for profile in profiles:
        values: dict[str, Any] = {"organization_id": org_id, "external_id": profile["external_id"]}
        update: dict[str, Any] = {"updated_at": func.now()}
        for key in PROFILE_FIELDS:
            if key in profile:
                value = profile[key]
                if key == "email" and value:
                    value = value.strip().lower()
                values[key] = value
        stmt = insert(Recipient).values(**values, attributes=profile.get("attributes") or {})
        for key in PROFILE_FIELDS:
            if key in profile:
                update[key] = stmt.excluded[key]
        if profile.get("attributes"):
            update["attributes"] = Recipient.attributes.op("||")(stmt.excluded.attributes)
        stmt = stmt.on_conflict_do_update(
            constraint="uq_recipients_organization_id_external_id", set_=update
        ).returning(Recipient.id)
        ids[profile["external_id"]] = db.session.execute(stmt).scalar_one()
    return ids


def ids_for_external_ids(external_ids: Sequence[str]) -> dict[str, int]:
    rows = db.session.execute(
        select(Recipient.external_id, Recipient.id).where(Recipient.external_id.in_(external_ids))
    ).all()
    return dict(rows)


# Above every recipient id: the upper end of the backward walk in `newest_recipient_id`.
_MAX_ID = 2**63 - 1


def newest_recipient_id() -> int:
    """The active organization's largest recipient id (0 with none): the bound that keeps
    recipients created after a launch out of its audience.

    Read backwards off the ``(organization_id, id)`` index from ``(org, max)``, and only
    the organization's own row counts. ``max(id)`` filtered by organization may be planned
    (as a generic plan of a prepared statement) as a backward walk of the primary key until
    the organization's first row: 250 ms over 2,000,000 recipients for a small
    organization whose recipients are old. The trigger statement reads its bound the same
    way, in SQL.
    """
    org_id = require_organization_id()
    newest = db.session.execute(
        # The row comparison bounds the walk by organization itself; the tenancy criteria
        # (an equality) would let the planner drop the organization from the order.
        unscoped(
            select(Recipient.organization_id, Recipient.id)
            .where(tuple_(Recipient.organization_id, Recipient.id) <= (org_id, _MAX_ID))
            .order_by(Recipient.organization_id.desc(), Recipient.id.desc())
            .limit(1)
        )
    ).first()
    return newest.id if newest is not None and newest.organization_id == org_id else 0


def require_valid(errors: list[FieldError]) -> None:
    if errors:
        raise ValidationError(errors)


# --- console look-ups and edits -----------------------------------------------------------

PAGE_SIZE = 50
FULL_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_ID = 2**63 - 1  # ids are bigint: a larger one names nothing (and must not reach SQL)


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _attribute_match(key: str, value: str) -> Any:
    """``key=value``: the attribute equals the text, or the JSON scalar it spells (42, true)."""
    options = [Recipient.attributes.contains({key: value})]
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    if parsed != value and (parsed is None or isinstance(parsed, bool | int | float)):
        options.append(Recipient.attributes.contains({key: parsed}))
    return or_(*options)


def search_filter(query: str) -> list[Any]:
    """SQL conditions for a console search: ``key=value`` terms match attributes, the rest
    of the text matches email, phone, external id or name (case-insensitive, anywhere),
    except that a complete email address or E.164 number matches exactly (email or phone,
    or the external id)."""
    query = query.replace("\x00", "").strip()
    try:
        terms = shlex.split(query)
    except ValueError:  # an unbalanced quote: take the words as typed
        terms = query.split()
    conditions: list[Any] = []
    words = []
    for term in terms:
        key, sep, value = term.partition("=")
        if sep and key:
            conditions.append(_attribute_match(key, value))
        else:
            words.append(term)
    text = " ".join(words)
    if FULL_EMAIL.match(text) or E164.match(text):
        # A whole address or number (support staff paste them): an index look-up, where a
        # substring scan reads every recipient of the organization.
        column = Recipient.email if "@" in text else Recipient.phone
        conditions.append(or_(column == text.lower(), Recipient.external_id == text))
    elif words:
        pattern = _like(text)
        conditions.append(
            or_(
                *(
                    column.ilike(pattern, escape="\\")
                    for column in (
                        Recipient.email,
                        Recipient.phone,
                        Recipient.external_id,
                        Recipient.name,
                    )
                )
            )
        )
    return conditions


def search_recipients(
    query: str = "", *, after: int | None = None, limit: int = PAGE_SIZE
) -> tuple[list[Recipient], int | None]:
    """One page of the current organization's recipients matching ``query``, newest first.

    Returns:
        The page, and the cursor (``after``) of the next page, or None on the last one.
    """
    stmt = select(Recipient).where(*search_filter(query))
    if after is not None:
        stmt = stmt.where(Recipient.id < min(after, MAX_ID))
    rows = list(db.session.scalars(stmt.order_by(Recipient.id.desc()).limit(limit + 1)))
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].id
    return rows, None


def get_recipient_by_id(recipient_id: int) -> Recipient:
    """Raises NotFound: no such recipient in the current organization."""
    recipient = None
    if 0 < recipient_id <= MAX_ID:
        recipient = db.session.scalar(select(Recipient).where(Recipient.id == recipient_id))
    if recipient is None:
        raise NotFound(f"No recipient {recipient_id}.")
    return recipient


def update_profile(recipient_id: int, changes: dict[str, Any], *, actor: Actor) -> Recipient:
    """Change profile fields (email, phone, name, locale, timezone); audited; commits.

    Empty strings clear a field.

    Raises:
        NotFound: no such recipient.
        ValidationError: a field is invalid.
    """
    recipient = get_recipient_by_id(recipient_id)
    wanted = {
        k: (v.strip() or None) if isinstance(v, str) else v
        for k, v in changes.items()
        if k in PROFILE_FIELDS
    }
    require_valid(validate_profile({"external_id": recipient.external_id, **wanted}))
    changed = {}
    for name, value in wanted.items():
        if name == "email" and value:
            value = value.lower()
        if getattr(recipient, name) != value:
            setattr(recipient, name, value)
            changed[name] = value
    if changed:
        record_audit(actor, "recipient.updated", "recipient", recipient.id, changed)
        db.session.commit()
    return recipient


def iter_recipients(*conditions: Any, batch: int = 1000) -> Iterator[Recipient]:
    """Every recipient of the current organization matching ``conditions``, by id, read in
    keyset batches so a large export never holds the whole table."""
    last = 0
    while True:
        rows = list(
            db.session.scalars(
                select(Recipient)
                .where(*conditions, Recipient.id > last)
                .order_by(Recipient.id)
                .limit(batch)
            )
        )
        yield from rows
        if len(rows) < batch:
            return
        last = rows[-1].id


def erase_recipient(recipient_id: int, *, actor: Actor) -> None:
    """Delete a recipient and their personal data; their deliveries stay, anonymised.

    The profile, devices, preferences and subscriptions go with the row (cascades). The
    ledger keeps every notification and delivery so funnel counts do not change, without
    the recipient, the address, the rendered message or the send's data. The row is deleted
    first: a planner that read it (FOR KEY SHARE) makes the delete wait until it commits, so
    the statements after it see, and anonymise, what that planner wrote. Does not commit.

    Raises:
        NotFound: no such recipient in this organization.
    """
    from whistle_web.deliveries.models import Delivery
    from whistle_web.notifications.models import Notification

    deleted = db.session.scalar(
        delete(Recipient)
        .where(Recipient.id == recipient_id)
        .returning(Recipient.id)
        .execution_options(synchronize_session="fetch")
    )
    if deleted is None:
        raise NotFound(f"No recipient {recipient_id}.")
    db.session.execute(
        update(Notification)
        .where(Notification.recipient_id == recipient_id)
        .values(recipient_id=None, data={})
        .execution_options(synchronize_session=False)
    )
    db.session.execute(
        update(Delivery)
        .where(Delivery.recipient_id == recipient_id)
        .values(recipient_id=None, address=None, rendered=None)
        .execution_options(synchronize_session=False)
    )
    record_audit(actor, "recipient.erased", "recipient", recipient_id)
