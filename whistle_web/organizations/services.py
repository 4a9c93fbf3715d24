"""Create organizations and record what changed in them."""

from __future__ import annotations

import re
import secrets
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import exists, select, tuple_

from whistle_web import crypto
from whistle_web.errors import Actor, FieldError, ValidationError
from whistle_web.extensions import db
from whistle_web.organizations.models import ActorType, AuditLog, Organization
from whistle_web.tenancy import require_organization_id


def slugify(name: str) -> str:
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:80]


def create_organization(name: str, *, slug: str | None = None) -> Organization:
    """Create an organization with a fresh widget signing secret; flushes, does not commit.

    Raises:
        ValidationError: empty name, or the slug is taken.
    """
    name = name.strip()
    if not name:
        raise ValidationError.single("name", "An organization needs a name.")
    slug = slugify(slug or name)
    if not slug:
        raise ValidationError.single("slug", "Use at least one letter or digit.")
    if db.session.scalar(select(exists().where(Organization.slug == slug))):
        raise ValidationError(FieldError("slug", f"The slug {slug!r} is already taken."))
    org = Organization(name=name, slug=slug)
    org.widget_secret_encrypted = crypto.encrypt(secrets.token_urlsafe(32).encode())
    db.session.add(org)
    db.session.flush()
    return org


def record_audit(
    actor: Actor,
    action: str,
    target_type: str,
    target_id: Any = None,
    changes: dict[str, Any] | None = None,
) -> AuditLog:
    """Append an audit entry in the current organization (committed with the change)."""
    entry = AuditLog(
        organization_id=require_organization_id(),
        actor_type=ActorType(actor.type),
        actor_id=actor.id,
        actor_label=actor.label,
        action=action,
        target_type=target_type,
        target_id=None if target_id is None else str(target_id),
        changes=changes or {},
        ip_address=actor.ip_address,
    )
    db.session.add(entry)
    return entry


# --- organization settings (the console's settings pages) --------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def current_organization() -> Organization:
    """The organization the current scope works in."""
    organization = db.session.get(Organization, require_organization_id())
    assert organization is not None  # the scope is only entered for an existing organization
    return organization


def update_organization(
    *,
    name: str,
    sender: dict[str, str],
    allowed_origins: list[str],
    actor: Actor,
) -> Organization:
    """Change the name, sender defaults (``from_name``, ``from_email``) and widget origins.

    Origins are stored normalized (``https://app.example.com``); other keys of
    ``Organization.settings`` (branding, layout) are left as they are. Commits.

    Raises:
        ValidationError: empty or long name (``name``), a bad sender address
            (``sender.from_email``), or an origin that is not ``scheme://host[:port]``
            (``allowed_origins[i]``).
    """
    from whistle_web.accounts.services import normalize_email
    from whistle_web.inbox.socket import normalize_origin

    organization = current_organization()
    errors: list[FieldError] = []
    name = name.strip()
    if not name:
        errors.append(FieldError("name", "An organization needs a name."))
    elif len(name) > 200:
        errors.append(FieldError("name", "Use at most 200 characters."))
    from_name = (sender.get("from_name") or "").strip()
    from_email = (sender.get("from_email") or "").strip()
    if len(from_name) > 200:
        errors.append(FieldError("sender.from_name", "Use at most 200 characters."))
    if from_email:
        try:
            from_email = normalize_email(from_email, field_name="sender.from_email")
        except ValidationError as exc:
            errors += exc.errors
    origins: list[str] = []
    for i, raw in enumerate(allowed_origins):
        origin = normalize_origin(raw) if "\x00" not in raw else None
        path = raw.strip().split("://", 1)[-1].partition("/")[2]
        if origin is None or path or "?" in raw or "#" in raw:
            errors.append(
                FieldError(
                    f"allowed_origins[{i}]",
                    f"{raw!r} is not an origin like https://app.example.com.",
                )
            )
        elif origin not in origins:
            origins.append(origin)
    if errors:
        raise ValidationError(errors)
    settings = dict(organization.settings or {})
    new_sender = {k: v for k, v in (("from_name", from_name), ("from_email", from_email)) if v}
    changes: dict[str, Any] = {}
    if name != organization.name:
        changes["name"] = name
        organization.name = name
    if new_sender != (settings.get("sender") or {}):
        changes["sender"] = new_sender
        settings["sender"] = new_sender
        organization.settings = settings
    if origins != list(organization.allowed_origins or []):
        changes["allowed_origins"] = origins
        organization.allowed_origins = origins
    if changes:
        record_audit(actor, "organization.updated", "organization", organization.id, changes)
        db.session.commit()
    return organization


def rotate_widget_secret(*, actor: Actor) -> str:
    """Give the organization a new widget signing secret. Commits.

    Recipient tokens signed with the old secret stop verifying at once: open widgets get
    their next token from the customer's backend, which must use the new secret.

    Returns:
        The new secret, for the customer's backend (stored only encrypted).
    """
    organization = current_organization()
    secret = secrets.token_urlsafe(32)
    organization.widget_secret_encrypted = crypto.encrypt(secret.encode())
    record_audit(actor, "organization.widget_secret_rotated", "organization", organization.id)
    db.session.commit()
    return secret


# --- the audit log -----------------------------------------------------------------------


def audit_entries(
    *,
    action: str = "",
    actor: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[list[AuditLog], str | None]:
    """The current organization's audit entries, newest first, one page at a time.

    ``action`` matches exactly, or as a prefix when it ends with ``.`` or ``*``
    (``provider.`` for every provider change); ``actor`` is a case-insensitive part of the
    actor's label; ``since``/``until`` bound ``created_at`` (``until`` exclusive); ``cursor``
    is the value returned with the previous page (an unreadable one starts over).

    Returns:
        (entries, the cursor of the next page or None).
    """
    stmt = select(AuditLog)
    action = action.strip().replace("\x00", "")
    if action.endswith(("*", ".")):
        stmt = stmt.where(AuditLog.action.like(_like_escape(action.rstrip("*")) + "%", escape="\\"))
    elif action:
        stmt = stmt.where(AuditLog.action == action)
    actor = actor.strip().replace("\x00", "")
    if actor:
        stmt = stmt.where(AuditLog.actor_label.ilike(f"%{_like_escape(actor)}%", escape="\\"))
    if since is not None:
        stmt = stmt.where(AuditLog.created_at >= since)
    if until is not None:
        stmt = stmt.where(AuditLog.created_at < until)
    position = _read_audit_cursor(cursor)
    if position is not None:
        stmt = stmt.where(tuple_(AuditLog.created_at, AuditLog.id) < position)
    stmt = stmt.order_by(AuditLog.created_at.desc(), AuditLog.id.desc()).limit(limit + 1)
    rows = list(db.session.scalars(stmt))
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = f"{(last.created_at - EPOCH) // MICROSECOND}~{last.id}"
    return rows[:limit], next_cursor


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _read_audit_cursor(cursor: str | None) -> tuple[datetime, int] | None:
    stamp, _, entry_id = (cursor or "").partition("~")
    try:
        moment = EPOCH + int(stamp) * MICROSECOND
        number = int(entry_id)
    except (ValueError, OverflowError, OSError):
        return None
    return (moment, number) if 0 < number < 2**63 else None


def audit_actions() -> list[str]:
    """The actions the current organization's audit log holds (for the filter's choices)."""
    return list(db.session.scalars(select(AuditLog.action).distinct().order_by(AuditLog.action)))
