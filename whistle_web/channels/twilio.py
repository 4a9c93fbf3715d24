"""SMS through Twilio's REST API (Programmable Messaging).

One ``POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json`` per message,
form-encoded ``To``, ``Body`` and ``From`` or ``MessagingServiceSid`` (the messaging service
wins when both are configured), plus ``StatusCallback`` when a callback URL is known (the
worker's ``message.meta["status_callback_url"]`` wins over the ``status_callback_url``
setting). HTTP basic auth with the account SID and auth token; one ``httpx.Client`` per
provider object, so the batch reuses its connection.

Outcomes:

* 2xx — sent; the provider message id is Twilio's message ``sid``.
* 429, 5xx, read/write timeouts — transient failure (try later).
* other 4xx — permanent failure carrying Twilio's ``code`` and ``message``; codes that mean
  the number itself is unusable (21211 invalid number, 21614 not a mobile number, ...) also
  set ``invalid_address``.
* 401 (credentials refused), connection refused or connect timeout — the whole provider is
  unusable: :class:`ProviderUnavailable` when nothing in the batch was sent yet, so the
  worker fails over; later in a batch the remaining messages fail transiently instead
  (raising then would lose the results of messages already sent, and resending them through
  another provider would deliver them twice).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

import httpx
from redis import Redis

from whistle_web.channels.base import (
    BaseProvider,
    Message,
    ProviderUnavailable,
    SendResult,
    register,
)
from whistle_web.channels.kinds import ProviderKind
from whistle_web.errors import FieldError

DEFAULT_BASE_URL = "https://api.twilio.com"
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 60.0
E164 = re.compile(r"^\+[1-9]\d{1,14}$")
ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
MESSAGING_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")

# Twilio error codes meaning the destination number can never receive SMS.
INVALID_NUMBER_CODES = frozenset(
    {
        21211,  # Invalid 'To' phone number
        21214,  # 'To' phone number cannot be reached
        21217,  # Phone number does not appear to be valid
        21401,  # Invalid phone number
        21407,  # This phone number type does not support SMS
        21614,  # 'To' number is not a valid mobile number
    }
)


def _number(value: Any, default: float) -> float:
    if value in (None, ""):
        return default
    return float(value)


@register
class TwilioProvider(BaseProvider):
    kind = ProviderKind.TWILIO
    required_credentials: ClassVar[tuple[str, ...]] = ("account_sid", "auth_token")

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
        account_sid = credentials.get("account_sid")
        if account_sid and not ACCOUNT_SID.match(str(account_sid)):
            errors.append(
                FieldError(
                    "credentials.account_sid", "An account SID is AC followed by 32 hex digits."
                )
            )
        from_number = settings.get("from_number")
        service_sid = settings.get("messaging_service_sid")
        if not from_number and not service_sid:
            errors.append(
                FieldError(
                    "settings.from_number",
                    "Set a sender number or a messaging service SID.",
                )
            )
        if from_number and not E164.match(str(from_number)):
            errors.append(
                FieldError(
                    "settings.from_number",
                    "Use the E.164 format: + then country code and number, e.g. +14155550100.",
                )
            )
        if service_sid and not MESSAGING_SERVICE_SID.match(str(service_sid)):
            errors.append(
                FieldError(
                    "settings.messaging_service_sid",
                    "A messaging service SID is MG followed by 32 hex digits.",
                )
            )
        for key in ("base_url", "status_callback_url"):
            value = settings.get(key)
            if value and (
                urlsplit(str(value)).scheme not in ("http", "https")
                or not urlsplit(str(value)).hostname
            ):
                errors.append(FieldError(f"settings.{key}", "Enter an http(s) URL."))
        try:
            timeout = _number(settings.get("timeout"), DEFAULT_TIMEOUT)
        except (TypeError, ValueError):
            timeout = -1.0
        if not 0 < timeout <= MAX_TIMEOUT:
            errors.append(
                FieldError("settings.timeout", f"Enter a number of seconds up to {MAX_TIMEOUT:g}.")
            )
        return errors

    # -- sending ------------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            base_url = str(self.settings.get("base_url") or DEFAULT_BASE_URL).rstrip("/")
            timeout = min(_number(self.settings.get("timeout"), DEFAULT_TIMEOUT), MAX_TIMEOUT)
            self._client = httpx.Client(
                base_url=base_url,
                auth=httpx.BasicAuth(
                    str(self.credentials["account_sid"]), str(self.credentials["auth_token"])
                ),
                timeout=timeout,
                follow_redirects=False,
                headers={"User-Agent": "Whistle/1", "Accept": "application/json"},
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        results: list[SendResult] = []
        for index, message in enumerate(messages):
            try:
                results.append(self._send(message))
            except ProviderUnavailable as exc:
                if not results:
                    raise
                results += [
                    SendResult.failed(m.delivery_id, f"Twilio unavailable: {exc}", transient=True)
                    for m in messages[index:]
                ]
                break
        return results

    def _form(self, message: Message) -> dict[str, str]:
        form = {"To": message.to, "Body": str(message.content.get("text") or "")}
        if self.settings.get("messaging_service_sid"):
            form["MessagingServiceSid"] = str(self.settings["messaging_service_sid"])
        else:
            form["From"] = str(self.settings["from_number"])
        callback = message.meta.get("status_callback_url") or self.settings.get(
            "status_callback_url"
        )
        if callback:
            form["StatusCallback"] = str(callback)
        return form

    def _send(self, message: Message) -> SendResult:
        if not message.to:
            return SendResult(
                message.delivery_id,
                False,
                error="No phone number to send to.",
                invalid_address=True,
            )
        if not message.content.get("text"):
            return SendResult.failed(message.delivery_id, "The SMS has no text.")
        account_sid = quote(str(self.credentials["account_sid"]), safe="")
        path = f"/2010-04-01/Accounts/{account_sid}/Messages.json"
        try:
            response = self.client.post(path, data=self._form(message))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ProviderUnavailable(f"cannot connect to Twilio: {exc}") from exc
        except httpx.TimeoutException as exc:
            return SendResult.failed(
                message.delivery_id, f"Twilio timed out: {type(exc).__name__}", transient=True
            )
        except httpx.TransportError as exc:
            return SendResult.failed(
                message.delivery_id, f"Twilio connection failed: {exc!r}", transient=True
            )
        return self._result(message, response)

    def _result(self, message: Message, response: httpx.Response) -> SendResult:
        status = response.status_code
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {}
        if 200 <= status < 300:
            sid = data.get("sid")
            return SendResult.sent(message.delivery_id, str(sid) if sid else None)
        code = data.get("code")
        detail = str(data.get("message") or response.text[:200] or response.reason_phrase)
        error = (
            f"Twilio error {code}: {detail} (HTTP {status})"
            if code
            else (f"Twilio HTTP {status}: {detail}")
        )
        if status == 401:
            raise ProviderUnavailable(error)
        if status == 429 or status >= 500:
            return SendResult.failed(message.delivery_id, error, transient=True)
        return SendResult(
            message.delivery_id,
            False,
            error=error,
            invalid_address=_int(code) in INVALID_NUMBER_CODES,
        )


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
