"""The small interface every provider implements, and the registry that finds them.

Providers never import Flask or the database. A channel worker builds one provider object
per batch from the provider row's settings and decrypted credentials, hands it rendered
messages, and records what it returns. One provider object is reused for the whole batch,
so connection reuse (an SMTP session, an HTTP client) lives inside it.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from redis import Redis

from whistle_web.channels.kinds import PROVIDER_CHANNEL, Channel, ProviderKind
from whistle_web.errors import FieldError


@dataclass(frozen=True)
class Message:
    """One rendered delivery ready to go out."""

    delivery_id: int
    channel: Channel
    # Email address, E.164 phone number, device token / Web Push endpoint, or webhook URL.
    to: str
    # email: subject, html, text · sms: text · push: title, body, data · in_app: title,
    # body, action_url · webhook: the JSON payload under "payload".
    content: dict[str, Any]
    # Extra headers (email: List-Unsubscribe, Message-ID), push device data, etc.
    headers: dict[str, str] = field(default_factory=dict)
    # Context a provider may need: organization_id, recipient_id, external_id, device data.
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    delivery_id: int
    ok: bool
    provider_message_id: str | None = None
    error: str | None = None
    # True when trying again later may succeed (timeouts, 429, 5xx, connection loss).
    transient: bool = False
    # True when the address itself is dead (invalid token, unknown number): disable it.
    invalid_address: bool = False

    @classmethod
    def sent(cls, delivery_id: int, provider_message_id: str | None = None) -> SendResult:
        return cls(delivery_id, True, provider_message_id)

    @classmethod
    def failed(cls, delivery_id: int, error: str, *, transient: bool = False) -> SendResult:
        return cls(delivery_id, False, error=error, transient=transient)


class ProviderUnavailable(Exception):
    """The provider as a whole cannot send right now (down, auth refused): fail over."""


class BaseProvider(abc.ABC):
    """Subclass per provider kind and decorate with :func:`register`."""

    kind: ClassVar[ProviderKind]
    # Keys of the credentials dict that must be present (secrets, stored encrypted).
    required_credentials: ClassVar[tuple[str, ...]] = ()
    # Keys of the settings dict that must be present (shown back to staff).
    required_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        settings: dict[str, Any],
        credentials: dict[str, Any],
        *,
        redis: Redis | None = None,
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        # Only the in-app provider publishes; the worker passes its Redis client.
        self.redis = redis

    @property
    def channel(self) -> Channel:
        return PROVIDER_CHANNEL[self.kind]

    @classmethod
    def validate(cls, settings: dict[str, Any], credentials: dict[str, Any]) -> list[FieldError]:
        """Check a configuration before it is saved; return one error per bad field."""
        errors = [
            FieldError(f"settings.{key}", "This setting is required.")
            for key in cls.required_settings
            if settings.get(key) in (None, "")
        ]
        errors += [
            FieldError(f"credentials.{key}", "This credential is required.")
            for key in cls.required_credentials
            if credentials.get(key) in (None, "")
        ]
        return errors

    @abc.abstractmethod
    def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        """Send each message; return one result per message, in order.

        Raises:
            ProviderUnavailable: nothing could be sent; the worker fails over.
        """

    def close(self) -> None:  # noqa: B027  (optional hook: most providers hold nothing)
        """Release connections held for the batch."""

    def __enter__(self) -> BaseProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_REGISTRY: dict[ProviderKind, type[BaseProvider]] = {}
_MODULES = {
    ProviderKind.IN_APP: "whistle_web.channels.in_app",
    ProviderKind.SMTP: "whistle_web.channels.smtp",
    ProviderKind.SES: "whistle_web.channels.ses",
    ProviderKind.TWILIO: "whistle_web.channels.twilio",
    ProviderKind.SNS: "whistle_web.channels.sns",
    ProviderKind.FCM: "whistle_web.channels.fcm",
    ProviderKind.WEBPUSH: "whistle_web.channels.webpush",
    ProviderKind.WEBHOOK: "whistle_web.channels.webhook",
}


def register(cls: type[BaseProvider]) -> type[BaseProvider]:
    _REGISTRY[cls.kind] = cls
    return cls


def provider_class(kind: ProviderKind | str) -> type[BaseProvider]:
    """The implementation of a provider kind (imported on first use)."""
    kind = ProviderKind(kind)
    if kind not in _REGISTRY:
        importlib.import_module(_MODULES[kind])
    return _REGISTRY[kind]
