"""Webhooks: POST a signed JSON payload to a customer's URL.

Each message's ``content["payload"]`` (a JSON object) goes as the request body to the
``url`` setting, or to ``message.to`` when that is non-empty. Headers::

    Content-Type: application/json
    User-Agent: Whistle-Webhooks/1
    Whistle-Delivery: <delivery id>            (the same on every retry: use it to dedupe)
    Whistle-Timestamp: <unix seconds when sent>
    Whistle-Signature: v1=<hex HMAC-SHA256>

Verifying a delivery (receiver side)
------------------------------------
1. Take the *raw* request body bytes exactly as received (before any JSON parsing).
2. Compute ``HMAC-SHA256(key=signing_secret, msg=timestamp + "." + raw_body)``, where
   ``timestamp`` is the ``Whistle-Timestamp`` header as sent, and hex-encode it (lower case).
3. Compare it with the value after ``v1=`` in ``Whistle-Signature`` in constant time.
4. Reject the request when the timestamp is more than a few minutes away from your clock
   (replay protection), and ignore ``Whistle-Delivery`` ids you have already processed.

In Python::

    import hashlib, hmac, time

    def verify(secret: bytes, headers, raw_body: bytes, tolerance: int = 300) -> bool:
        timestamp = headers["Whistle-Timestamp"]
        expected = hmac.new(
            secret, timestamp.encode() + b"." + raw_body, hashlib.sha256
        ).hexdigest()
        scheme, _, signature = headers["Whistle-Signature"].partition("=")
        return (
            scheme == "v1"
            and hmac.compare_digest(expected, signature)
            and abs(time.time() - int(timestamp)) <= tolerance
        )

Outcomes: 2xx → sent (provider message id = the response's ``X-Request-Id`` header, if
any). 408, 429, 5xx, timeouts and connection errors → transient. Redirects are never
followed: a 3xx is a permanent failure, as is any other 4xx.

Private networks: unless the ``allow_private_networks`` setting is true, a URL whose host
resolves to any non-public address (loopback, private, link-local such as the cloud metadata
address, ...) or whose scheme is not http/https is refused — a permanent failure, nothing is
sent. The connection itself goes through ``netguard.GuardedTransport``, which connects only
to addresses it resolved and checked, so a DNS answer that changes between the check and the
connection cannot reach a private address. Environment proxies are not used. See
:mod:`whistle_web.channels.netguard`.

Response bodies are read up to 64 KiB (uncompressed: ``Accept-Encoding: identity``); the
``timeout`` applies to each network operation (connect, each read), not to the request as a
whole.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx
from redis import Redis

from whistle_web.channels import netguard
from whistle_web.channels.base import BaseProvider, Message, SendResult, register
from whistle_web.channels.kinds import ProviderKind
from whistle_web.errors import FieldError

USER_AGENT = "Whistle-Webhooks/1"
DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 30.0
MIN_SECRET_LENGTH = 16
TRANSIENT_STATUSES = frozenset({408, 429})
# How much of an error response body goes into the failure message.
ERROR_BODY_CHARS = 200
# Response bodies are read up to this size (the endpoint is not trusted to keep them small);
# a longer body is dropped with its connection.
MAX_RESPONSE_BYTES = 64 * 1024


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The ``Whistle-Signature`` header value for a body sent at ``timestamp``."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def _timeout(value: Any) -> float:
    if value in (None, ""):
        return DEFAULT_TIMEOUT
    if isinstance(value, bool):
        raise ValueError("not a number")
    return float(value)


@register
class WebhookProvider(BaseProvider):
    kind = ProviderKind.WEBHOOK
    required_settings: ClassVar[tuple[str, ...]] = ("url",)
    required_credentials: ClassVar[tuple[str, ...]] = ("signing_secret",)

    def __init__(
        self,
        settings: dict[str, Any],
        credentials: dict[str, Any],
        *,
        redis: Redis | None = None,
    ) -> None:
        super().__init__(settings, credentials, redis=redis)
        self._client: httpx.Client | None = None

    @classmethod
    def validate(cls, settings: dict[str, Any], credentials: dict[str, Any]) -> list[FieldError]:
        errors = super().validate(settings, credentials)
        url = settings.get("url")
        if url:
            try:
                netguard.split_url(str(url))
            except netguard.BlockedDestination:
                errors.append(FieldError("settings.url", "Enter an http(s) URL."))
        secret = credentials.get("signing_secret")
        if secret and len(str(secret)) < MIN_SECRET_LENGTH:
            errors.append(
                FieldError(
                    "credentials.signing_secret",
                    f"Use at least {MIN_SECRET_LENGTH} characters.",
                )
            )
        try:
            timeout = _timeout(settings.get("timeout"))
        except (TypeError, ValueError):
            timeout = -1.0
        if not 0 < timeout <= MAX_TIMEOUT:
            errors.append(
                FieldError("settings.timeout", f"Enter a number of seconds up to {MAX_TIMEOUT:g}.")
            )
        allow_private = settings.get("allow_private_networks")
        if allow_private is not None and not isinstance(allow_private, bool):
            errors.append(FieldError("settings.allow_private_networks", "Use true or false."))
        return errors

    @property
    def allow_private(self) -> bool:
        return self.settings.get("allow_private_networks") is True

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                transport=netguard.GuardedTransport(allow_private=self.allow_private),
                timeout=min(_timeout(self.settings.get("timeout")), MAX_TIMEOUT),
                follow_redirects=False,
                trust_env=False,
                headers={"User-Agent": USER_AGENT},
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        # Each message may go to another endpoint: an unreachable one fails only its own
        # deliveries (transiently) and never makes the provider as a whole unavailable.
        return [self._send(message) for message in messages]

    def _send(self, message: Message) -> SendResult:
        delivery_id = message.delivery_id
        url = message.to or str(self.settings.get("url") or "")
        payload = message.content.get("payload")
        if not isinstance(payload, dict):
            return SendResult.failed(delivery_id, "The webhook payload is not a JSON object.")
        try:
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            return SendResult.failed(delivery_id, f"The webhook payload is not JSON: {exc}")
        try:
            netguard.check_url(url, self.allow_private)
        except netguard.BlockedDestination as exc:
            return SendResult.failed(delivery_id, f"Blocked webhook destination: {exc}")
        except netguard.UnresolvableHost as exc:
            return SendResult.failed(delivery_id, f"Webhook host: {exc}", transient=True)

        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            # Plain bodies only, so the size limit below counts real bytes (no gzip bombs).
            "Accept-Encoding": "identity",
            "Whistle-Delivery": str(delivery_id),
            "Whistle-Timestamp": str(timestamp),
            "Whistle-Signature": sign(str(self.credentials["signing_secret"]), timestamp, body),
        }
        try:
            with self.client.stream("POST", url, content=body, headers=headers) as response:
                return self._result(delivery_id, response)
        except netguard.BlockedDestination as exc:  # re-checked at connect time
            return SendResult.failed(delivery_id, f"Blocked webhook destination: {exc}")
        except httpx.TimeoutException as exc:
            return SendResult.failed(
                delivery_id, f"Webhook timed out ({type(exc).__name__})", transient=True
            )
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.UnsupportedProtocol):
                return SendResult.failed(delivery_id, f"Webhook URL not usable: {exc}")
            return SendResult.failed(
                delivery_id,
                f"Webhook connection failed: {type(exc).__name__}: {exc}",
                transient=True,
            )
        except httpx.InvalidURL as exc:
            return SendResult.failed(delivery_id, f"Webhook URL not usable: {exc}")

    def _result(self, delivery_id: int, response: httpx.Response) -> SendResult:
        status = response.status_code
        if 200 <= status < 300:
            _read_limited(response)  # drained, the connection goes back to the pool
            return SendResult.sent(delivery_id, response.headers.get("X-Request-Id") or None)
        if 300 <= status < 400:
            location = response.headers.get("Location", "")
            return SendResult.failed(
                delivery_id,
                f"Webhook endpoint answered HTTP {status} (redirects are not followed)"
                + (f" to {location[:ERROR_BODY_CHARS]}" if location else ""),
            )
        text = _read_limited(response).decode("utf-8", "replace")[:ERROR_BODY_CHARS].strip()
        error = f"Webhook endpoint answered HTTP {status}" + (f": {text}" if text else "")
        transient = status in TRANSIENT_STATUSES or status >= 500
        return SendResult.failed(delivery_id, error, transient=transient)


def _read_limited(response: httpx.Response, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """Up to ``limit`` bytes of a streamed response body (all of it when it is shorter).

    A body that breaks off or stalls is cut short: the status line already decided the
    outcome, and a 2xx must not turn into a retry (a duplicate) because of its body.
    """
    data = bytearray()
    try:
        for chunk in response.iter_raw():
            data += chunk
            if len(data) >= limit:
                break
    except httpx.HTTPError:
        pass
    return bytes(data[:limit])
