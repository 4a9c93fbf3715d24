"""Amazon SNS message verification and the SES events it carries (no Flask here).

SNS signs every HTTP(S) message: the signature covers a canonical string of some of the
message's fields and is made with the key of an X.509 certificate SNS publishes at
``SigningCertURL``. The certificate is only fetched from URLs matching an allow-list pattern
(AWS's own hosts by default: TLS to that host is what makes the key trustworthy), and is
cached in memory. ``SignatureVersion`` 1 is SHA1withRSA, 2 is SHA256withRSA.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

log = logging.getLogger(__name__)

DEFAULT_URL_PATTERN = r"^https://sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/"
NOTIFICATION = "Notification"
SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"

# The fields each message type signs, in the order of the canonical string.
_CONFIRMATION_KEYS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
SIGNED_KEYS: dict[str, tuple[str, ...]] = {
    NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    SUBSCRIPTION_CONFIRMATION: _CONFIRMATION_KEYS,
    UNSUBSCRIBE_CONFIRMATION: _CONFIRMATION_KEYS,
}
# Signed only when present.
OPTIONAL_KEYS = frozenset({"Subject"})
HASHES: dict[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
MAX_CERTIFICATE_BYTES = 64 * 1024
FETCH_TIMEOUT_SECONDS = 10.0


class SnsVerificationError(ValueError):
    """The message is not a validly signed SNS message (answer 403)."""


class CertificateUnavailable(SnsVerificationError):
    """The signing certificate could not be fetched right now (answer 5xx so SNS retries)."""


def canonical_string(message: dict[str, Any]) -> bytes:
    """The bytes SNS signed: ``Key\\nValue\\n`` for each signed key of the message's type.

    Raises:
        SnsVerificationError: unknown type, or a signed field missing or not a string.
    """
    keys = SIGNED_KEYS.get(str(message.get("Type")))
    if keys is None:
        raise SnsVerificationError("unknown SNS message type")
    parts: list[str] = []
    for key in keys:
        value = message.get(key)
        if value is None and key in OPTIONAL_KEYS:
            continue
        if not isinstance(value, str):
            raise SnsVerificationError(f"the SNS message has no {key}")
        parts.append(f"{key}\n{value}\n")
    return "".join(parts).encode("utf-8")


def is_allowed_url(url: Any, pattern: str) -> bool:
    """True when ``url`` matches the allow-list pattern and has no tricks in its authority."""
    if not isinstance(url, str) or not re.match(pattern, url):
        return False
    if re.search(r"[\x00-\x20\x7f\\]", url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return (
        parts.scheme in ("https", "http")
        and bool(parts.hostname)
        and parts.username is None
        and parts.password is None
    )


def fetch_certificate(url: str) -> bytes:
    """GET the PEM certificate (no redirects: the allow-listed host must serve it)."""
    response = httpx.get(url, timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=False)
    response.raise_for_status()
    if len(response.content) > MAX_CERTIFICATE_BYTES:
        raise ValueError("certificate too large")
    return response.content


@dataclass
class CertificateCache:
    """Public keys of signing certificates by URL, kept in memory until they expire."""

    max_entries: int = 64
    _keys: OrderedDict[str, tuple[rsa.RSAPublicKey, datetime]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def public_key(self, url: str, fetch: Callable[[str], bytes]) -> rsa.RSAPublicKey:
        now = datetime.now(UTC)
        with self._lock:
            cached = self._keys.get(url)
            if cached is not None and cached[1] > now:
                self._keys.move_to_end(url)
                return cached[0]
        try:
            pem = fetch(url)
        except (httpx.HTTPError, ValueError) as exc:
            raise CertificateUnavailable(f"cannot fetch the signing certificate: {exc}") from exc
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise SnsVerificationError("the signing certificate is not a PEM certificate") from exc
        if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
            raise SnsVerificationError("the signing certificate is expired or not yet valid")
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise SnsVerificationError("the signing certificate has no RSA key")
        with self._lock:
            self._keys[url] = (key, certificate.not_valid_after_utc)
            self._keys.move_to_end(url)
            while len(self._keys) > self.max_entries:
                self._keys.popitem(last=False)
        return key

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()


CERTIFICATES = CertificateCache()


def verify_message(
    message: dict[str, Any],
    *,
    cert_url_pattern: str = DEFAULT_URL_PATTERN,
    cache: CertificateCache = CERTIFICATES,
    fetch: Callable[[str], bytes] = fetch_certificate,
) -> None:
    """Check an SNS message's signature; return quietly when it is valid.

    Raises:
        CertificateUnavailable: the (allowed) certificate URL did not answer.
        SnsVerificationError: anything else is wrong with the message or its signature.
    """
    if not isinstance(message, dict):
        raise SnsVerificationError("the body is not an SNS message")
    algorithm = HASHES.get(str(message.get("SignatureVersion")))
    if algorithm is None:
        raise SnsVerificationError("unsupported SignatureVersion")
    cert_url = message.get("SigningCertURL")
    if not is_allowed_url(cert_url, cert_url_pattern):
        raise SnsVerificationError("SigningCertURL is not an allowed SNS certificate URL")
    signed = canonical_string(message)
    try:
        signature = base64.b64decode(message.get("Signature") or "", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SnsVerificationError("the signature is not base64") from exc
    key = cache.public_key(cert_url, fetch)
    try:
        key.verify(signature, signed, padding.PKCS1v15(), algorithm())
    except InvalidSignature as exc:
        raise SnsVerificationError("the signature does not match") from exc


def confirm_subscription(
    message: dict[str, Any],
    *,
    subscribe_url_pattern: str = DEFAULT_URL_PATTERN,
    get: Callable[..., httpx.Response] = httpx.get,
) -> None:
    """Visit the SubscribeURL of a verified SubscriptionConfirmation.

    Raises:
        SnsVerificationError: the SubscribeURL is not allowed.
        httpx.HTTPError: the confirmation request failed.
    """
    url = message.get("SubscribeURL")
    if not is_allowed_url(url, subscribe_url_pattern):
        raise SnsVerificationError("SubscribeURL is not an allowed SNS URL")
    response = get(url, timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=False)
    response.raise_for_status()


@dataclass(frozen=True)
class SesEvent:
    """One SES event mapped to a Whistle ledger event."""

    ses_type: str
    message_id: str
    # "delivered", "bounced", "soft_bounce", "complaint", "opened" or "clicked".
    event_type: str
    data: dict[str, Any]
    at: datetime | None
    # Lower-cased addresses the event is about (empty: every recipient of the message).
    addresses: frozenset[str] = frozenset()


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _addresses(items: Any, key: str | None = "emailAddress") -> frozenset[str]:
    found: set[str] = set()
    for item in items if isinstance(items, list) else []:
        value = item.get(key) if key and isinstance(item, dict) else item
        if isinstance(value, str) and value.strip():
            found.add(value.strip().lower())
    return frozenset(found)


def parse_ses_event(text: Any) -> SesEvent | None:
    """Map the ``Message`` of an SES notification (event publishing or identity
    notifications) to a ledger event; None for anything Whistle does not track.
    """
    try:
        event = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    ses_type = event.get("eventType") or event.get("notificationType")
    mail = event.get("mail")
    message_id = mail.get("messageId") if isinstance(mail, dict) else None
    if not isinstance(ses_type, str) or not isinstance(message_id, str) or not message_id:
        return None

    def section(name: str) -> dict[str, Any]:
        value = event.get(name)
        return value if isinstance(value, dict) else {}

    if ses_type == "Delivery":
        detail = section("delivery")
        return SesEvent(
            ses_type,
            message_id,
            "delivered",
            {},
            _timestamp(detail.get("timestamp")),
            _addresses(detail.get("recipients"), None),
        )
    if ses_type == "Bounce":
        detail = section("bounce")
        permanent = detail.get("bounceType") == "Permanent"
        data: dict[str, Any] = {"bounce_type": "permanent" if permanent else "transient"}
        if isinstance(detail.get("bounceSubType"), str):
            data["bounce_sub_type"] = detail["bounceSubType"]
        return SesEvent(
            ses_type,
            message_id,
            # A transient (or undetermined) bounce may still be delivered: no ledger move.
            "bounced" if permanent else "soft_bounce",
            data,
            _timestamp(detail.get("timestamp")),
            _addresses(detail.get("bouncedRecipients")),
        )
    if ses_type == "Complaint":
        detail = section("complaint")
        data = {}
        if isinstance(detail.get("complaintFeedbackType"), str):
            data["feedback_type"] = detail["complaintFeedbackType"]
        return SesEvent(
            ses_type,
            message_id,
            "complaint",
            data,
            _timestamp(detail.get("timestamp")),
            _addresses(detail.get("complainedRecipients")),
        )
    if ses_type == "Open":
        detail = section("open")
        return SesEvent(ses_type, message_id, "opened", {}, _timestamp(detail.get("timestamp")))
    if ses_type == "Click":
        detail = section("click")
        data = {"url": detail["link"]} if isinstance(detail.get("link"), str) else {}
        return SesEvent(ses_type, message_id, "clicked", data, _timestamp(detail.get("timestamp")))
    return None
