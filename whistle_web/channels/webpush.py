"""Web Push (RFC 8030) with VAPID (RFC 8292) and aes128gcm payload encryption (RFC 8291).

``message.to`` is the subscription's endpoint URL and ``message.meta["keys"]`` its
``{"p256dh": ..., "auth": ...}`` keys, as the browser's ``PushSubscription.toJSON()`` gives
them. pywebpush encrypts and sends; the provider loads the VAPID key once per provider
object and shares one requests session (keep-alive to each push service) across the batch.

Result mapping: 200/201/202 sent (the provider message id is the ``Location`` header);
404/410 permanent with ``invalid_address`` (the subscription is gone); 429, 5xx, timeouts and
connection errors transient; 413 and every other status permanent. Endpoints belong to many
push services, so one endpoint failing never makes the whole provider unavailable; only a
VAPID key or subject that cannot sign raises :class:`ProviderUnavailable`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from typing import Any

import http_ece
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid, VapidException
from pywebpush import WebPushException, webpush

from whistle_web.channels.base import (
    BaseProvider,
    Message,
    ProviderUnavailable,
    SendResult,
    register,
)
from whistle_web.channels.kinds import ProviderKind
from whistle_web.errors import FieldError

DEFAULT_TTL = 86400
# Push services keep messages at most about four weeks; FCM caps TTL at 28 days.
MAX_TTL = 28 * 86400
DEFAULT_TIMEOUT = 10.0
# What py_vapid accepts as the "sub" claim: a mailto: address, or an https URL with no path.
_SUBJECT = re.compile(r"^(mailto:[^@\s]+@[^@\s]+|https://[^/\s?#]+)$", re.IGNORECASE)
_SAMPLE_AUDIENCE = "https://push.example.com"


def load_vapid_key(value: Any) -> ec.EllipticCurvePrivateKey:
    """The VAPID P-256 private key from PEM, or base64url of the raw 32-byte scalar (or DER).

    Raises:
        ValueError: the key does not load or is not a P-256 key.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("The VAPID private key is empty.")
    text = value.strip()
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            if len(raw) == 32:
                key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
            else:
                key = serialization.load_der_private_key(raw, password=None)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValueError(
            "The VAPID private key does not load (PEM or base64url raw key expected)."
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("The VAPID private key must be an EC P-256 key.")
    return key


def _vapid(settings: dict[str, Any], credentials: dict[str, Any]) -> Vapid:
    """A signer for these settings, checked by signing a sample claim set.

    Raises:
        ValueError: the key does not load or the subject is rejected.
    """
    vapid = Vapid(private_key=load_vapid_key(credentials.get("vapid_private_key")))
    subject = settings.get("vapid_subject")
    if not isinstance(subject, str) or not _SUBJECT.match(subject):
        raise ValueError("vapid_subject must be mailto:you@example.com or https://your.host")
    try:
        vapid.sign({"sub": subject, "aud": _SAMPLE_AUDIENCE})
    except VapidException as exc:
        raise ValueError(f"VAPID signing failed: {exc}") from exc
    return vapid


def _number(settings: dict[str, Any], key: str, default: float) -> float:
    value = settings.get(key)
    return default if value in (None, "") else float(value)


@register
class WebPushProvider(BaseProvider):
    kind = ProviderKind.WEBPUSH
    required_settings = ("vapid_subject",)
    required_credentials = ("vapid_private_key",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._signer: Vapid | None = None
        self._session: requests.Session | None = None

    @classmethod
    def validate(cls, settings: dict[str, Any], credentials: dict[str, Any]) -> list[FieldError]:
        errors = super().validate(settings, credentials)
        subject = settings.get("vapid_subject")
        if subject not in (None, "") and (
            not isinstance(subject, str) or not _SUBJECT.match(subject)
        ):
            errors.append(
                FieldError(
                    "settings.vapid_subject",
                    "Use a mailto: address or an https:// URL with no path "
                    "(mailto:push@example.com, https://example.com).",
                )
            )
        ttl = settings.get("ttl")
        if ttl not in (None, "") and (
            isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TTL
        ):
            errors.append(FieldError("settings.ttl", f"Must be whole seconds from 0 to {MAX_TTL}."))
        try:
            if _number(settings, "timeout", DEFAULT_TIMEOUT) <= 0:
                raise ValueError
        except (TypeError, ValueError):
            errors.append(FieldError("settings.timeout", "Must be a positive number of seconds."))
        if credentials.get("vapid_private_key") not in (None, ""):
            try:
                load_vapid_key(credentials["vapid_private_key"])
            except ValueError as exc:
                errors.append(FieldError("credentials.vapid_private_key", str(exc)))
            else:
                if not any(e.field == "settings.vapid_subject" for e in errors) and subject:
                    # The exact check a send makes: sign a sample claim set.
                    try:
                        _vapid(settings, credentials)
                    except ValueError as exc:
                        errors.append(FieldError("settings.vapid_subject", str(exc)))
        return errors

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        if self._signer is None:
            try:
                self._signer = _vapid(self.settings, self.credentials)
            except ValueError as exc:
                raise ProviderUnavailable(f"Web Push: {exc}") from exc
        if self._session is None:
            self._session = requests.Session()
        return [self._send_one(message) for message in messages]

    def _payload(self, message: Message) -> str:
        content = message.content
        payload: dict[str, Any] = {
            "title": content.get("title") or "",
            "body": content.get("body") or "",
        }
        url = content.get("url") or content.get("action_url")
        if url:
            payload["url"] = url
        for key in ("image", "data"):
            if content.get(key):
                payload[key] = content[key]
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)

    def _send_one(self, message: Message) -> SendResult:
        delivery_id = message.delivery_id
        keys = message.meta.get("keys")
        if (
            not isinstance(keys, dict)
            or not isinstance(keys.get("p256dh"), str)
            or not isinstance(keys.get("auth"), str)
            or not keys["p256dh"]
            or not keys["auth"]
        ):
            return SendResult.failed(
                delivery_id,
                "Web Push subscription keys missing: the device data needs "
                '{"keys": {"p256dh": ..., "auth": ...}}.',
            )
        try:
            response = webpush(
                subscription_info={
                    "endpoint": message.to,
                    "keys": {"p256dh": keys["p256dh"], "auth": keys["auth"]},
                },
                data=self._payload(message),
                vapid_private_key=self._signer,
                # A fresh dict per call: pywebpush writes the endpoint's "aud" into it.
                vapid_claims={"sub": self.settings["vapid_subject"]},
                ttl=int(_number(self.settings, "ttl", DEFAULT_TTL)),
                timeout=_number(self.settings, "timeout", DEFAULT_TIMEOUT),
                requests_session=self._session,
            )
        except WebPushException as exc:
            if exc.response is None:
                return SendResult.failed(delivery_id, f"Web Push subscription unusable: {exc}")
            return self._failure(delivery_id, exc.response)
        except requests.Timeout as exc:
            return SendResult.failed(delivery_id, f"Web Push timeout: {exc}", transient=True)
        except requests.ConnectionError as exc:
            return SendResult.failed(
                delivery_id, f"Web Push connection failed: {exc}", transient=True
            )
        except requests.RequestException as exc:
            return SendResult.failed(delivery_id, f"Web Push endpoint unusable: {exc}")
        except VapidException as exc:
            return SendResult.failed(delivery_id, f"Web Push endpoint unusable for VAPID: {exc}")
        except (ValueError, TypeError, binascii.Error, http_ece.ECEException) as exc:
            return SendResult.failed(delivery_id, f"Web Push subscription keys unusable: {exc!r}")
        return SendResult.sent(delivery_id, response.headers.get("Location") or None)

    @staticmethod
    def _failure(delivery_id: int, response: requests.Response) -> SendResult:
        status = response.status_code
        error = f"Web Push HTTP {status} {response.reason or ''}".rstrip()
        detail = (response.text or "").strip()[:200]
        if detail:
            error += f": {detail}"
        if status in (404, 410):
            return SendResult(delivery_id, False, error=error, invalid_address=True)
        if status == 429 or status >= 500:
            retry_after = response.headers.get("Retry-After")
            if retry_after:
                error += f" (Retry-After: {retry_after})"
            return SendResult.failed(delivery_id, error, transient=True)
        if status == 413:
            error += " (payload too large for Web Push, about 4 KB at most)"
        return SendResult.failed(delivery_id, error)
