"""Email through Amazon SES (API v2, ``SendEmail`` with simple content).

Settings: ``region``, ``from_email``, optional ``from_name``, ``configuration_set``,
``endpoint_url`` (a compatible endpoint or a local test server) and ``timeout`` (seconds).
Credentials: ``access_key_id`` and ``secret_access_key``.

Throttling and 5xx answers are transient; rejected messages and unverified senders are
permanent; an unreachable endpoint, bad credentials or a suspended account raise
:class:`ProviderUnavailable` so the worker fails over.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from email.utils import formataddr
from typing import Any
from urllib.parse import urlsplit

from whistle_web.channels.base import (
    BaseProvider,
    Message,
    ProviderUnavailable,
    SendResult,
    register,
)
from whistle_web.channels.kinds import ProviderKind
from whistle_web.channels.smtp import address_error, one_line
from whistle_web.errors import FieldError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
# Error codes (without the "Exception" suffix SES v2 adds) and what they mean for a send.
TRANSIENT_CODES = {
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "LimitExceeded",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalError",
    "RequestTimeout",
}
PERMANENT_CODES = {
    "MessageRejected",
    "MailFromDomainNotVerified",
    "BadRequest",
    "InvalidParameterValue",
    "NotFound",
}
# The provider as a whole cannot send: credentials refused, account paused.
UNAVAILABLE_CODES = {
    "UnrecognizedClient",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "InvalidSignature",
    "ExpiredToken",
    "AccessDenied",
    "AccountSuspended",
    "SendingPaused",
}
# SES writes these itself; the rest of a message's headers (List-Unsubscribe…) are passed on.
_SKIPPED_HEADERS = {"from", "to", "cc", "bcc", "subject", "message-id", "date", "mime-version"}


def _code(name: str) -> str:
    return name.removesuffix("Exception")


@register
class SesProvider(BaseProvider):
    kind = ProviderKind.SES
    required_settings = ("region", "from_email")
    required_credentials = ("access_key_id", "secret_access_key")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: Any = None

    @classmethod
    def validate(cls, settings: dict[str, Any], credentials: dict[str, Any]) -> list[FieldError]:
        errors = super().validate(settings, credentials)
        failed = {e.field for e in errors}
        if "settings.from_email" not in failed:
            message = address_error(settings.get("from_email"))
            if message:
                errors.append(FieldError("settings.from_email", message))
        endpoint = settings.get("endpoint_url")
        if endpoint:
            parts = urlsplit(str(endpoint))
            if parts.scheme not in ("http", "https") or not parts.netloc:
                errors.append(FieldError("settings.endpoint_url", "Must be an http(s) URL."))
        timeout = settings.get("timeout")
        if timeout not in (None, ""):
            try:
                ok = float(timeout) > 0 and not isinstance(timeout, bool)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                errors.append(
                    FieldError("settings.timeout", "Must be a positive number of seconds.")
                )
        return errors

    @property
    def client(self) -> Any:
        """The ``sesv2`` client, made on first use and kept for the provider's lifetime."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            timeout = float(self.settings.get("timeout") or DEFAULT_TIMEOUT)
            session = boto3.session.Session(
                aws_access_key_id=self.credentials.get("access_key_id"),
                aws_secret_access_key=self.credentials.get("secret_access_key"),
                aws_session_token=self.credentials.get("session_token") or None,
                region_name=self.settings["region"],
            )
            self._client = session.client(
                "sesv2",
                endpoint_url=self.settings.get("endpoint_url") or None,
                config=Config(
                    connect_timeout=timeout,
                    read_timeout=timeout,
                    # The worker retries failed deliveries itself; one quick retry smooths
                    # over a blip without holding the batch up.
                    retries={"mode": "standard", "max_attempts": 2},
                    max_pool_connections=2,
                ),
            )
        return self._client

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
        )

        results: list[SendResult] = []
        for index, message in enumerate(messages):
            unavailable: str | None = None
            try:
                request = self._request(message)
            except ValueError as exc:
                results.append(SendResult.failed(message.delivery_id, f"bad message: {exc}"))
                continue
            try:
                response = self.client.send_email(**request)
            except ClientError as exc:
                error = exc.response.get("Error", {})
                code = _code(str(error.get("Code", "")))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                text = f"{code}: {error.get('Message', '')}".strip()
                if code in UNAVAILABLE_CODES:
                    unavailable = f"SES refused the request ({text})"
                else:
                    results.append(
                        SendResult.failed(
                            message.delivery_id, text, transient=_transient(code, status)
                        )
                    )
            except (EndpointConnectionError, ConnectTimeoutError) as exc:
                unavailable = f"cannot reach SES: {exc}"
            except BotoCoreError as exc:
                # Read timeouts, dropped connections: the message may or may not have gone.
                results.append(SendResult.failed(message.delivery_id, str(exc), transient=True))
            else:
                results.append(SendResult.sent(message.delivery_id, response["MessageId"]))
            if unavailable:
                if not any(r.ok for r in results):
                    raise ProviderUnavailable(unavailable)
                # Part of the batch went out: keep it here, retry the rest later.
                results += [
                    SendResult.failed(m.delivery_id, unavailable, transient=True)
                    for m in messages[index:]
                ]
                break
        return results

    def _request(self, message: Message) -> dict[str, Any]:
        content = message.content
        body: dict[str, Any] = {}
        if content.get("text"):
            body["Text"] = {"Data": str(content["text"]), "Charset": "UTF-8"}
        if content.get("html"):
            body["Html"] = {"Data": str(content["html"]), "Charset": "UTF-8"}
        if not body:
            body["Text"] = {"Data": "", "Charset": "UTF-8"}
        simple: dict[str, Any] = {
            "Subject": {"Data": one_line(content.get("subject")), "Charset": "UTF-8"},
            "Body": body,
        }
        headers = [
            {"Name": name, "Value": str(value)}
            for name, value in message.headers.items()
            if value is not None and name.lower() not in _SKIPPED_HEADERS
        ]
        for header in headers:
            if any(c in header["Name"] + header["Value"] for c in "\r\n"):
                raise ValueError(f"header {header['Name']!r} contains a line break")
        if headers:
            simple["Headers"] = headers
        from_email = str(self.settings["from_email"]).strip()
        from_name = str(self.settings.get("from_name") or "").strip()
        request: dict[str, Any] = {
            "FromEmailAddress": formataddr((from_name, from_email), charset="utf-8")
            if from_name
            else from_email,
            "Destination": {"ToAddresses": [message.to]},
            "Content": {"Simple": simple},
        }
        if self.settings.get("configuration_set"):
            request["ConfigurationSetName"] = str(self.settings["configuration_set"])
        return request


def _transient(code: str, status: int) -> bool:
    if code in PERMANENT_CODES:
        return False
    return code in TRANSIENT_CODES or status == 429 or status >= 500
