"""Recipient preferences, devices and widget tokens.

Preferences are switches ``recipient × (category or every category) × (channel or every
channel) → on/off``; with none set a channel is on, and the most specific switch wins (the
planner applies the same order). Critical categories ignore switches and unsubscribe, so
they cannot be switched off here.

Recipient tokens let the in-app widget act as one recipient: an HS256 JWT signed with the
organization's widget secret, so the customer's backend can also mint them itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from typing import Any

import jwt
from sqlalchemy import delete, func, literal_column, select
from sqlalchemy.dialects.postgresql import insert

from whistle_web import crypto
from whistle_web.channels.kinds import Channel
from whistle_web.errors import (
    Actor,
    DomainError,
    FieldError,
    InvalidState,
    NotFound,
    ValidationError,
)
from whistle_web.extensions import db
from whistle_web.organizations.models import Organization
from whistle_web.organizations.services import record_audit
from whistle_web.preferences.models import Category, Preference
from whistle_web.recipients.models import Device, DeviceKind, Recipient
from whistle_web.tenancy import require_organization_id

CHANNELS: tuple[Channel, ...] = tuple(Channel)
TOKEN_AUDIENCE = "whistle-widget"  # noqa: S105  (an audience name, not a secret)
TOKEN_TTL = timedelta(hours=1)
MIN_TOKEN_TTL = timedelta(seconds=60)
MAX_TOKEN_TTL = timedelta(days=1)
# Keys the send pipeline puts next to a device's data; a device may not shadow them.
RESERVED_DEVICE_KEYS = frozenset(
    {
        "organization_id",
        "recipient_id",
        "external_id",
        "notification_id",
        "data",
        "created_at",
        "device_id",
        "device_kind",
    }
)

MAX_ID = 2**63 - 1  # ids are bigint: a larger one names nothing (and must not reach SQL)
PrefKey = tuple[int | None, str | None]


def get_recipient(external_id: str) -> Recipient:
    """Raises NotFound: no recipient with this external id in the current organization."""
    recipient = None
    if "\x00" not in external_id:
        recipient = db.session.scalar(select(Recipient).where(Recipient.external_id == external_id))
    if recipient is None:
        raise NotFound(f"No recipient {external_id!r}.")
    return recipient


# --- preferences ------------------------------------------------------------------------


def _switches(recipient_id: int) -> dict[PrefKey, bool]:
    rows = db.session.execute(
        select(Preference.category_id, Preference.channel, Preference.enabled).where(
            Preference.recipient_id == recipient_id
        )
    ).all()
    return {(cat, str(channel) if channel else None): enabled for cat, channel, enabled in rows}


def _effective(switches: dict[PrefKey, bool], category_id: int | None, channel: str) -> bool:
    keys: list[PrefKey] = []
    if category_id is not None:
        keys += [(category_id, channel), (category_id, None)]
    keys += [(None, channel), (None, None)]
    for key in keys:
        if key in switches:
            return switches[key]
    return True


def get_preferences(external_id: str) -> dict[str, Any]:
    """The recipient's effective preferences.

    Returns:
        ``{"unsubscribed", "quiet_hours": {"start", "end"} | None, "channels": {channel:
        bool}, "categories": [{"key", "name", "critical", "channels": {channel: bool}}]}``.
    """
    recipient = get_recipient(external_id)
    switches = _switches(recipient.id)
    categories = db.session.scalars(select(Category).order_by(Category.name, Category.id)).all()
    quiet = None
    if recipient.quiet_hours_start is not None and recipient.quiet_hours_end is not None:
        quiet = {"start": recipient.quiet_hours_start, "end": recipient.quiet_hours_end}
    return {
        "unsubscribed": recipient.unsubscribed_at is not None,
        "quiet_hours": quiet,
        "channels": {str(c): _effective(switches, None, str(c)) for c in CHANNELS},
        "categories": [
            {
                "key": category.key,
                "name": category.name,
                "critical": category.critical,
                "channels": {
                    str(c): True if category.critical else _effective(switches, category.id, c)
                    for c in CHANNELS
                },
            }
            for category in categories
        ],
    }


def update_preferences(
    external_id: str,
    *,
    unsubscribed: bool | None = None,
    quiet_hours: tuple[time, time] | bool | None = False,
    channels: Mapping[str, bool | None] | None = None,
    categories: Sequence[Mapping[str, Any]] | None = None,
    actor: Actor,
) -> dict[str, Any]:
    """Change what is given and nothing else; commits.

    Args:
        unsubscribed: True sets the global unsubscribe, False clears it, None leaves it.
        quiet_hours: ``(start, end)`` sets them, None clears them, False leaves them.
        channels: channel -> on/off for every category; None removes the switch.
        categories: ``[{"key": ..., "channels": {channel: on/off/None}}]``.

    A switch is only written when it changes the effective value (or an explicit switch
    with another value exists), so sending back what :func:`get_preferences` returned
    changes nothing.

    Raises:
        NotFound: no such recipient.
        ValidationError: an unknown channel or category (``categories[i].key``), or a
            critical category switched off (``categories[i].channels.<channel>``).
    """
    recipient = get_recipient(external_id)
    errors: list[FieldError] = []
    wanted: dict[PrefKey, bool | None] = {}
    for channel, enabled in (channels or {}).items():
        if channel not in CHANNELS:
            errors.append(FieldError(f"channels.{channel}", "Unknown channel."))
        else:
            wanted[(None, channel)] = enabled
    if categories:
        keys = [str(item.get("key")) for item in categories]
        by_key = {
            c.key: c for c in db.session.scalars(select(Category).where(Category.key.in_(keys)))
        }
        for i, item in enumerate(categories):
            category = by_key.get(keys[i])
            if category is None:
                errors.append(FieldError(f"categories[{i}].key", f"No category {keys[i]!r}."))
                continue
            for channel, enabled in (item.get("channels") or {}).items():
                path = f"categories[{i}].channels.{channel}"
                if channel not in CHANNELS:
                    errors.append(FieldError(path, "Unknown channel."))
                elif category.critical and enabled is False:
                    errors.append(
                        FieldError(path, f"{category.key!r} is critical: it cannot be turned off.")
                    )
                elif not (category.critical and enabled):  # critical ones are on regardless
                    wanted[(category.id, channel)] = enabled
    if isinstance(quiet_hours, tuple) and quiet_hours[0] == quiet_hours[1]:
        errors.append(FieldError("quiet_hours.end", "Must differ from the start."))
    if errors:
        raise ValidationError(errors)

    changes: dict[str, Any] = {}
    if unsubscribed is not None and unsubscribed != (recipient.unsubscribed_at is not None):
        recipient.unsubscribed_at = datetime.now(UTC) if unsubscribed else None
        changes["unsubscribed"] = unsubscribed
    if quiet_hours is not False:
        start, end = quiet_hours if isinstance(quiet_hours, tuple) else (None, None)
        if (start, end) != (recipient.quiet_hours_start, recipient.quiet_hours_end):
            recipient.quiet_hours_start, recipient.quiet_hours_end = start, end
            changes["quiet_hours"] = (
                {"start": start.isoformat(), "end": end.isoformat()} if start and end else None
            )
    # All-category switches first, so a category switch is compared with what it would
    # inherit after them: a value equal to the inherited one writes nothing, and sending
    # back the document GET returns does not pin every switch.
    after = _switches(recipient.id)
    set_rows: list[dict[str, Any]] = []
    cleared: list[PrefKey] = []
    for key in sorted(wanted, key=lambda k: k[0] is not None):
        enabled = wanted[key]
        if enabled is None:
            if key in after:
                cleared.append(key)
                del after[key]
            continue
        current = after[key] if key in after else _effective(after, *key)
        if current != enabled:
            after[key] = enabled
            set_rows.append(
                {
                    "organization_id": require_organization_id(),
                    "recipient_id": recipient.id,
                    "category_id": key[0],
                    "channel": Channel(key[1]),
                    "enabled": enabled,
                }
            )
    if set_rows:
        stmt = insert(Preference).values(set_rows)
        db.session.execute(
            stmt.on_conflict_do_update(
                index_elements=["recipient_id", "category_id", "channel"],
                set_={"enabled": stmt.excluded.enabled, "updated_at": datetime.now(UTC)},
            )
        )
    for category_id, channel in cleared:
        db.session.execute(
            delete(Preference).where(
                Preference.recipient_id == recipient.id,
                Preference.category_id.is_(None)
                if category_id is None
                else Preference.category_id == category_id,
                Preference.channel == Channel(channel),
            )
        )
    if set_rows or cleared:
        names = {c.id: c.key for c in db.session.scalars(select(Category))}
        changes["switches"] = [
            {
                "category": names.get(row["category_id"]),
                "channel": str(row["channel"]),
                "on": row["enabled"],
            }
            for row in set_rows
        ] + [{"category": names.get(c), "channel": ch, "on": None} for c, ch in cleared]
    if changes:
        record_audit(actor, "recipient.preferences_updated", "recipient", recipient.id, changes)
        db.session.commit()
    return get_preferences(external_id)


# --- devices ----------------------------------------------------------------------------


def _check_device(kind: DeviceKind, token: str, data: Mapping[str, Any]) -> None:
    errors = []
    for key in sorted(RESERVED_DEVICE_KEYS & set(data)):
        errors.append(FieldError(f"data.{key}", "This key is reserved."))
    if kind == DeviceKind.WEBPUSH:
        if not token.startswith("https://"):
            errors.append(FieldError("token", "A Web Push endpoint is an https:// URL."))
        keys = data.get("keys")
        if not isinstance(keys, dict):
            errors.append(FieldError("data.keys", 'Web Push needs {"p256dh": ..., "auth": ...}.'))
        else:
            for name in ("p256dh", "auth"):
                if not isinstance(keys.get(name), str) or not keys[name]:
                    errors.append(FieldError(f"data.keys.{name}", "Required for Web Push."))
    if errors:
        raise ValidationError(errors)


def register_device(
    external_id: str,
    kind: DeviceKind | str,
    token: str,
    data: Mapping[str, Any] | None = None,
    *,
    actor: Actor,
) -> tuple[Device, bool]:
    """Register a push device, or update the one with this token (it may move to this
    recipient: devices change hands). A device the provider disabled is enabled again.
    Commits.

    Returns:
        The device, and whether it was created.

    Raises:
        NotFound: no such recipient.
        ValidationError: Web Push without ``data.keys.p256dh``/``auth``, reserved data keys.
    """
    kind = DeviceKind(kind)
    data = dict(data or {})
    recipient = get_recipient(external_id)
    _check_device(kind, token, data)
    now = datetime.now(UTC)
    stmt = insert(Device).values(
        organization_id=require_organization_id(),
        recipient_id=recipient.id,
        kind=kind,
        token=token,
        data=data,
        last_seen_at=now,
    )
    device_id, created = db.session.execute(
        stmt.on_conflict_do_update(
            index_elements=["organization_id", "kind", "token"],
            set_={
                "recipient_id": stmt.excluded.recipient_id,
                "data": stmt.excluded["data"],
                "last_seen_at": stmt.excluded.last_seen_at,
                "disabled_at": None,
                "updated_at": func.now(),
            },
        ).returning(Device.id, literal_column("xmax = 0"))
    ).one()
    device = db.session.get(Device, device_id, populate_existing=True)
    record_audit(
        actor,
        "device.registered" if created else "device.updated",
        "device",
        device.id,
        {"recipient": external_id, "kind": kind.value},
    )
    db.session.commit()
    return device, created


def list_devices(external_id: str) -> list[Device]:
    recipient = get_recipient(external_id)
    return list(
        db.session.scalars(
            select(Device).where(Device.recipient_id == recipient.id).order_by(Device.id.desc())
        )
    )


def delete_device(external_id: str, device_id: int, *, actor: Actor) -> None:
    """Raises NotFound: no such recipient, or the device is not theirs."""
    recipient = get_recipient(external_id)
    device = None
    if 0 < device_id <= MAX_ID:
        device = db.session.scalar(
            select(Device).where(Device.id == device_id, Device.recipient_id == recipient.id)
        )
    if device is None:
        raise NotFound(f"Recipient {external_id!r} has no device {device_id}.")
    db.session.execute(delete(Device).where(Device.id == device.id))
    record_audit(
        actor,
        "device.deleted",
        "device",
        device_id,
        {"recipient": external_id, "kind": device.kind.value},
    )
    db.session.commit()


# --- recipient tokens -------------------------------------------------------------------


class InvalidRecipientToken(DomainError):
    status = 401
    title = "Unauthorized"


@dataclass(frozen=True)
class RecipientClaims:
    organization_id: int
    external_id: str
    issued_at: datetime
    expires_at: datetime


def _widget_secret(organization_id: int) -> bytes:
    organization = db.session.get(Organization, organization_id)
    if organization is None or not organization.widget_secret_encrypted:
        raise InvalidState("The organization has no widget secret.")
    return _unsealed(organization.widget_secret_encrypted)


@lru_cache(maxsize=4096)
def _unsealed(sealed: bytes) -> bytes:
    """Every socket and feed request verifies a token: unseal each secret once per process
    (with KMS, once per process instead of one KMS call per connection). Keyed by the sealed
    bytes, so a rotated secret is a new entry and the old one is never used again.
    """
    return crypto.decrypt(sealed)


def issue_recipient_token(
    organization_id: int,
    external_id: str,
    *,
    ttl: timedelta = TOKEN_TTL,
    now: datetime | None = None,
) -> tuple[str, datetime]:
    """A JWT that lets the widget act as this recipient until it expires.

    Claims: ``sub`` (external id), ``org`` (organization id), ``aud`` ("whistle-widget"),
    ``iat``, ``exp``. Does not check that the recipient exists.

    Returns:
        The token and its expiry.

    Raises:
        ValidationError: ``ttl_seconds`` outside 60 s .. 24 h.
        InvalidState: the organization has no widget secret.
    """
    if not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
        raise ValidationError.single("ttl_seconds", "Between 60 and 86400 seconds.")
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    expires_at = now + ttl
    claims = {
        "sub": external_id,
        "org": organization_id,
        "aud": TOKEN_AUDIENCE,
        "iat": int(now.timestamp()),
        "exp": int(expires_at.timestamp()),
    }
    return jwt.encode(claims, _widget_secret(organization_id), algorithm="HS256"), expires_at


def verify_recipient_token(
    token: str, *, organization_id: int | None = None, leeway: int = 0
) -> RecipientClaims:
    """Check a recipient token's signature (with its organization's widget secret),
    audience and expiry.

    Args:
        organization_id: when given, a token of another organization is refused.

    Raises:
        InvalidRecipientToken: malformed, forged, expired, or for another audience or
            organization.
    """
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
        org_id = unverified.get("org")
        if not isinstance(org_id, int) or isinstance(org_id, bool):
            raise InvalidRecipientToken("The recipient token is not valid.")
        if organization_id is not None and org_id != organization_id:
            raise InvalidRecipientToken("The recipient token is not valid.")
        try:
            secret = _widget_secret(org_id)
        except InvalidState:
            raise InvalidRecipientToken("The recipient token is not valid.") from None
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            audience=TOKEN_AUDIENCE,
            leeway=leeway,
            options={"require": ["sub", "org", "aud", "iat", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidRecipientToken("The recipient token expired.") from None
    except jwt.PyJWTError:
        raise InvalidRecipientToken("The recipient token is not valid.") from None
    if claims["org"] != org_id or not isinstance(claims["sub"], str) or not claims["sub"]:
        raise InvalidRecipientToken("The recipient token is not valid.")
    return RecipientClaims(
        organization_id=org_id,
        external_id=claims["sub"],
        issued_at=datetime.fromtimestamp(claims["iat"], UTC),
        expires_at=datetime.fromtimestamp(claims["exp"], UTC),
    )
