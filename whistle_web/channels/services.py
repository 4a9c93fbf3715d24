"""Providers: create, change, delete and test a channel integration.

A provider's configuration arrives as one ``config`` object; the keys that are secrets
(per kind) are stored envelope-encrypted as credentials and are never shown back, the
rest are settings. Validation is the provider class's own
(:meth:`whistle_web.channels.base.BaseProvider.validate`), reported at ``config.<key>``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import current_app
from sqlalchemy import exists, select

from whistle_web import get_redis
from whistle_web.accounts.services import normalize_email
from whistle_web.channels.base import Message, ProviderUnavailable, SendResult, provider_class
from whistle_web.channels.kinds import PROVIDER_CHANNEL, Channel, ProviderKind
from whistle_web.channels.models import Provider
from whistle_web.errors import Actor, FieldError, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.organizations.services import record_audit
from whistle_web.recipients.models import DeviceKind, Recipient
from whistle_web.recipients.services import E164, require_valid
from whistle_web.tenancy import require_organization_id

log = logging.getLogger(__name__)

# Configuration keys that are secrets whatever the kind; a kind's required credentials are
# secrets too (a Twilio account SID travels with its auth token).
SECRET_KEYS = frozenset(
    {
        "password",
        "auth_token",
        "secret_access_key",
        "access_key_id",
        "session_token",
        "service_account_json",
        "vapid_private_key",
        "signing_secret",
        "api_key",
        "username",
    }
)
# Kinds whose settings accept a ``timeout`` in seconds (clamped to the test budget).
TIMEOUT_KINDS = frozenset(
    {
        ProviderKind.SMTP,
        ProviderKind.SES,
        ProviderKind.TWILIO,
        ProviderKind.FCM,
        ProviderKind.WEBPUSH,
        ProviderKind.WEBHOOK,
    }
)
PUSH_DEVICE_KIND = {ProviderKind.FCM: DeviceKind.FCM, ProviderKind.WEBPUSH: DeviceKind.WEBPUSH}
TEST_BUDGET_SECONDS = 10.0


def secret_keys(kind: ProviderKind | str) -> frozenset[str]:
    """The configuration keys of this kind stored as encrypted credentials."""
    return SECRET_KEYS | frozenset(provider_class(kind).required_credentials)


def split_config(
    kind: ProviderKind | str, config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config`` -> (settings, credentials) for this kind."""
    secrets = secret_keys(kind)
    settings = {k: v for k, v in config.items() if k not in secrets}
    credentials = {k: v for k, v in config.items() if k in secrets}
    return settings, credentials


def config_errors(
    kind: ProviderKind | str, settings: dict[str, Any], credentials: dict[str, Any]
) -> list[FieldError]:
    """The provider's own validation, with fields named ``config.<key>``."""
    errors = []
    for error in provider_class(kind).validate(settings, credentials):
        _, _, key = error.field.partition(".")
        errors.append(FieldError(f"config.{key or error.field}", error.message))
    return errors


def credentials_set(provider: Provider) -> list[str]:
    """Names of the credentials that hold a value (never the values)."""
    return sorted(k for k, v in provider.get_credentials().items() if v not in (None, ""))


def get_provider(provider_id: int) -> Provider:
    """Raises NotFound: no such provider in the current organization."""
    # Ids are bigints: PostgreSQL refuses to compare with a larger number.
    provider = db.session.get(Provider, provider_id) if 0 < provider_id < 2**63 else None
    if provider is None:
        raise NotFound("Provider not found.")
    return provider


def _check_name(name: str, *, other_than: int | None = None) -> list[FieldError]:
    name = name.strip()
    if not name:
        return [FieldError("name", "Give the provider a name.")]
    clash = exists().where(Provider.name == name)
    if other_than is not None:
        clash = clash.where(Provider.id != other_than)
    if db.session.scalar(select(clash)):
        return [FieldError("name", f"A provider named {name!r} already exists.")]
    return []


def create_provider(
    *,
    channel: Channel | str,
    kind: ProviderKind | str,
    name: str,
    config: dict[str, Any],
    rate_limit_per_second: float | None = None,
    priority: int = 100,
    enabled: bool = True,
    actor: Actor,
) -> Provider:
    """Validate and save a provider. Commits.

    Raises:
        ValidationError: a wrong channel for the kind (``channel``), a taken ``name``, or a
            bad configuration (``config.<key>``).
    """
    require_organization_id()
    kind = ProviderKind(kind)
    channel = Channel(channel)
    errors: list[FieldError] = []
    if PROVIDER_CHANNEL[kind] != channel:
        errors.append(
            FieldError("channel", f"A {kind.value} provider serves {PROVIDER_CHANNEL[kind].value}.")
        )
    errors += _check_name(name)
    settings, credentials = split_config(kind, _without_nulls(config))
    errors += config_errors(kind, settings, credentials)
    require_valid(errors)
    provider = Provider(
        channel=channel,
        kind=kind,
        name=name.strip(),
        settings=settings,
        priority=priority,
        rate_limit_per_second=rate_limit_per_second,
        enabled=enabled,
    )
    provider.set_credentials(credentials)
    db.session.add(provider)
    db.session.flush()
    record_audit(
        actor,
        "provider.created",
        "provider",
        provider.id,
        {
            "name": provider.name,
            "channel": channel.value,
            "kind": kind.value,
            "settings": sorted(settings),
            "credentials": sorted(credentials),
        },
    )
    db.session.commit()
    return provider


def update_provider(provider_id: int, changes: dict[str, Any], *, actor: Actor) -> Provider:
    """Change a provider. Commits.

    ``changes`` holds only what the caller sent: ``name``, ``config`` (merged key by key
    into the settings and credentials; omitted keys keep their value, a null removes the
    key), ``rate_limit_per_second`` (null removes the limit), ``priority``, ``enabled``.

    Raises:
        NotFound: no such provider. ValidationError: as for :func:`create_provider`.
    """
    provider = get_provider(provider_id)
    errors: list[FieldError] = []
    audit: dict[str, Any] = {}
    # name, priority and enabled cannot be cleared: a null is the same as leaving them out.
    changes = {
        k: v
        for k, v in changes.items()
        if v is not None or k in ("config", "rate_limit_per_second")
    }
    if "name" in changes:
        errors += _check_name(changes["name"], other_than=provider.id)
    settings = dict(provider.settings or {})
    credentials = provider.get_credentials()
    config = changes.get("config")
    if config:
        secrets = secret_keys(provider.kind)
        for key, value in config.items():
            target = credentials if key in secrets else settings
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
        errors += config_errors(provider.kind, settings, credentials)
        audit["config"] = sorted(config)  # key names only: values may be secrets
    require_valid(errors)
    if "name" in changes and changes["name"].strip() != provider.name:
        provider.name = changes["name"].strip()
        audit["name"] = provider.name
    if config:
        provider.settings = settings
        provider.set_credentials(credentials)
    for field_name in ("rate_limit_per_second", "priority", "enabled"):
        if field_name in changes and getattr(provider, field_name) != changes[field_name]:
            setattr(provider, field_name, changes[field_name])
            audit[field_name] = changes[field_name]
    if audit:
        record_audit(actor, "provider.updated", "provider", provider.id, audit)
    db.session.commit()
    return provider


def delete_provider(provider_id: int, *, actor: Actor) -> None:
    """Delete a provider; its past deliveries keep their history without it. Commits.

    Raises:
        NotFound: no such provider.
    """
    provider = get_provider(provider_id)
    record_audit(actor, "provider.deleted", "provider", provider.id, {"name": provider.name})
    db.session.delete(provider)
    db.session.commit()


def _without_nulls(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if v is not None}


# --- test send ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeOutcome:
    ok: bool
    provider_message_id: str | None = None
    error: str | None = None


def send_test_message(
    provider_id: int,
    to: str | None,
    *,
    device_data: dict[str, Any] | None = None,
    actor: Actor,
    budget: float | None = None,
) -> ProbeOutcome:
    """Send one test message through this provider now, waiting at most ``budget`` seconds.

    ``to`` is an email address, an E.164 number, a push token or Web Push endpoint (with
    ``device_data`` such as ``{"keys": {...}}``), a recipient's external id (in-app), or a
    URL replacing the webhook's own (optional). Commits the audit entry.

    Raises:
        NotFound: no such provider. ValidationError: ``to`` does not fit the channel.
    """
    budget = TEST_BUDGET_SECONDS if budget is None else budget
    provider = get_provider(provider_id)
    message = _test_message(provider, to, device_data or {})
    settings = dict(provider.settings or {})
    kind = ProviderKind(provider.kind)
    if kind in TIMEOUT_KINDS:
        settings["timeout"] = min(_seconds(settings.get("timeout"), budget), budget)
    if kind == ProviderKind.WEBHOOK and current_app.config.get("WHISTLE_WEBHOOK_ALLOW_PRIVATE"):
        settings.setdefault("allow_private_networks", True)
    outcome = send_with_budget(kind, settings, provider.get_credentials(), message, budget)
    record_audit(
        actor,
        "provider.tested",
        "provider",
        provider.id,
        {"ok": outcome.ok, "error": outcome.error},
    )
    db.session.commit()
    return outcome


def send_with_budget(
    kind: ProviderKind,
    settings: dict[str, Any],
    credentials: dict[str, Any],
    message: Message,
    budget: float,
) -> ProbeOutcome:
    """Run the provider in a helper thread; give up waiting after ``budget`` seconds."""
    redis = get_redis() if kind == ProviderKind.IN_APP else None

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with provider_class(kind)(settings, credentials, redis=redis) as impl:
                box["result"] = impl.send_batch([message])[0]
        except BaseException as error:  # handed to the waiting request below
            box["error"] = error

    # A daemon thread: a provider that hangs past its own timeout never holds up shutdown.
    thread = threading.Thread(target=run, name="provider-test", daemon=True)
    thread.start()
    thread.join(budget)
    if thread.is_alive():
        return ProbeOutcome(False, error=f"No answer from the provider within {budget:g} s.")
    error = box.get("error")
    if isinstance(error, ProviderUnavailable):
        return ProbeOutcome(False, error=f"Provider unavailable: {error}")
    if error is not None:  # a provider bug or library error: report it, don't crash
        log.warning("provider test failed: %r", error)
        return ProbeOutcome(False, error=f"{type(error).__name__}: {error}")
    result: SendResult = box["result"]
    if result.ok:
        return ProbeOutcome(True, provider_message_id=result.provider_message_id)
    return ProbeOutcome(False, error=result.error or "The provider refused the message.")


def _seconds(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default


def _test_message(provider: Provider, to: str | None, device_data: dict[str, Any]) -> Message:
    """The test message for the provider's channel, addressed to ``to``.

    Raises:
        ValidationError: at ``to``.
    """
    org_id = require_organization_id()
    channel = Channel(provider.channel)
    now = datetime.now(UTC).isoformat()
    title = "Whistle test message"
    body = f"This is a test message sent through the provider {provider.name!r}."
    meta: dict[str, Any] = {"organization_id": org_id, "test": True}
    to = (to or "").strip()
    if channel != Channel.WEBHOOK and not to:
        raise ValidationError.single("to", "Give the address to send the test message to.")
    if channel == Channel.EMAIL:
        address = normalize_email(to, field_name="to")
        domain = str(provider.settings.get("from_email") or "").rpartition("@")[2]
        headers = {"Message-ID": f"<whistle.test.{uuid.uuid4().hex}@{domain or 'whistle.invalid'}>"}
        content = {"subject": title, "text": body, "html": f"<p>{body}</p>"}
        return Message(0, channel, address, content, headers=headers, meta=meta)
    if channel == Channel.SMS:
        if not E164.match(to):
            raise ValidationError.single("to", "Use E.164 format, e.g. +14155550100.")
        return Message(0, channel, to, {"text": body}, meta=meta)
    if channel == Channel.PUSH:
        kind = PUSH_DEVICE_KIND[ProviderKind(provider.kind)]
        meta = {**meta, **device_data, "device_kind": kind.value}
        return Message(0, channel, to, {"title": title, "body": body}, meta=meta)
    if channel == Channel.IN_APP:
        recipient_id = None
        if "\x00" not in to:
            recipient_id = db.session.scalar(
                select(Recipient.id).where(Recipient.external_id == to)
            )
        if recipient_id is None:
            raise ValidationError.single("to", f"No recipient {to!r}.")
        meta = {
            **meta,
            "recipient_id": recipient_id,
            "external_id": to,
            "notification_id": None,
            "data": {},
            "created_at": now,
        }
        return Message(0, channel, to, {"title": title, "body": body}, meta=meta)
    payload = {"type": "test", "provider": provider.name, "message": body, "sent_at": now}
    return Message(0, channel, to, {"payload": payload}, meta=meta)


# --- failover order ----------------------------------------------------------------------


def providers_by_channel() -> dict[Channel, list[Provider]]:
    """Every provider of the current organization, per channel in failover order."""
    rows = db.session.scalars(
        select(Provider).order_by(Provider.channel, Provider.priority, Provider.id)
    )
    grouped: dict[Channel, list[Provider]] = {channel: [] for channel in Channel}
    for provider in rows:
        grouped[Channel(provider.channel)].append(provider)
    return grouped


def move_provider(provider_id: int, offset: int, *, actor: Actor) -> list[Provider]:
    """Move a provider ``offset`` places in its channel's failover order (-1: earlier). Commits.

    The channel's providers are renumbered 10, 20, 30... so that equal priorities (the
    default is 100 for all) still give a definite order to move in.

    Returns:
        The channel's providers in their new order.

    Raises:
        NotFound: no such provider.
    """
    provider = get_provider(provider_id)
    siblings = list(
        db.session.scalars(
            select(Provider)
            .where(Provider.channel == provider.channel)
            .order_by(Provider.priority, Provider.id)
            .with_for_update()
        )
    )
    index = siblings.index(provider)
    target = max(0, min(len(siblings) - 1, index + offset))
    if target != index:
        siblings.insert(target, siblings.pop(index))
        for position, sibling in enumerate(siblings, start=1):
            sibling.priority = position * 10
        record_audit(
            actor,
            "provider.reordered",
            "provider",
            provider.id,
            {"channel": str(provider.channel), "order": [p.name for p in siblings]},
        )
        db.session.commit()
    return siblings
