"""Create and update recipients (the customer's end users)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from whistle_web.errors import FieldError, ValidationError
from whistle_web.extensions import db
from whistle_web.recipients.models import Recipient
from whistle_web.tenancy import require_organization_id

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


def require_valid(errors: list[FieldError]) -> None:
    if errors:
        raise ValidationError(errors)
