"""Create organizations and record what changed in them."""

from __future__ import annotations

import re
import secrets
import unicodedata
from typing import Any

from sqlalchemy import exists, select

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
