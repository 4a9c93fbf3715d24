"""SMS through Amazon SNS: ``sns.publish(PhoneNumber=..., Message=..., MessageAttributes=...)``.

Settings: ``region``; optional ``sms_type`` (``Transactional``, the default, or
``Promotional``), ``sender_id`` (1–11 letters/digits, where the destination country supports
sender IDs) and ``endpoint_url`` (another endpoint, e.g. a VPC endpoint or a test server).
Credentials: ``access_key_id`` and ``secret_access_key``. One boto3 client per provider
object, closed by :meth:`SnsProvider.close`.

botocore's own retries are off: a throttled or failed message comes back as a transient
failure at once and the worker's retry schedule decides when to try again, instead of the
batch stalling in botocore's backoff.

Outcomes: ``MessageId`` → sent. Throttling, 429 and 5xx, read timeouts, dropped connections
→ transient. ``InvalidParameter`` and other client errors → permanent (``invalid_address``
when the error is about the phone number). No connection to the endpoint, or credentials
refused → :class:`ProviderUnavailable` when nothing in the batch went out yet (later in a
batch the rest fail transiently, so messages already sent are not resent elsewhere).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
from botocore.config import Config
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

SMS_TYPES = ("Transactional", "Promotional")
SENDER_ID = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9]{1,11}$")
REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "Throttled",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "KMSThrottling",
        "KMSThrottlingException",
    }
)
# The account or its credentials are refused: no message can go out through this provider.
AUTH_CODES = frozenset(
    {
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "AuthFailure",
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidAccessKeyId",
    }
)
INVALID_PARAMETER_CODES = frozenset({"InvalidParameter", "InvalidParameterValue"})


@register
class SnsProvider(BaseProvider):
    kind = ProviderKind.SNS
    required_settings: ClassVar[tuple[str, ...]] = ("region",)
    required_credentials: ClassVar[tuple[str, ...]] = ("access_key_id", "secret_access_key")

    def __init__(
        self,
        settings: dict[str, Any],
        credentials: dict[str, Any],
        *,
        redis: Redis | None = None,
    ) -> None:
        super().__init__(settings, credentials, redis=redis)
        self._client: Any = None

    @classmethod
    def validate(cls, settings: dict[str, Any], credentials: dict[str, Any]) -> list[FieldError]:
        errors = super().validate(settings, credentials)
        region = settings.get("region")
        if region and not REGION.match(str(region)):
            errors.append(FieldError("settings.region", "Enter an AWS region, e.g. eu-west-1."))
        sms_type = settings.get("sms_type")
        if sms_type and sms_type not in SMS_TYPES:
            errors.append(FieldError("settings.sms_type", "Choose Transactional or Promotional."))
        sender_id = settings.get("sender_id")
        if sender_id and not SENDER_ID.match(str(sender_id)):
            errors.append(
                FieldError(
                    "settings.sender_id",
                    "Use 1 to 11 letters and digits, with at least one letter.",
                )
            )
        endpoint_url = settings.get("endpoint_url")
        if endpoint_url and (
            urlsplit(str(endpoint_url)).scheme not in ("http", "https")
            or not urlsplit(str(endpoint_url)).hostname
        ):
            errors.append(FieldError("settings.endpoint_url", "Enter an http(s) URL."))
        return errors

    # -- sending ------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            session = boto3.session.Session(
                aws_access_key_id=str(self.credentials["access_key_id"]),
                aws_secret_access_key=str(self.credentials["secret_access_key"]),
                region_name=str(self.settings["region"]),
            )
            self._client = session.client(
                "sns",
                endpoint_url=self.settings.get("endpoint_url") or None,
                config=Config(
                    connect_timeout=CONNECT_TIMEOUT,
                    read_timeout=READ_TIMEOUT,
                    retries={"mode": "standard", "total_max_attempts": 1},
                ),
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
                    SendResult.failed(m.delivery_id, f"SNS unavailable: {exc}", transient=True)
                    for m in messages[index:]
                ]
                break
        return results

    def _attributes(self) -> dict[str, dict[str, str]]:
        attributes = {
            "AWS.SNS.SMS.SMSType": {
                "DataType": "String",
                "StringValue": str(self.settings.get("sms_type") or "Transactional"),
            }
        }
        if self.settings.get("sender_id"):
            attributes["AWS.SNS.SMS.SenderID"] = {
                "DataType": "String",
                "StringValue": str(self.settings["sender_id"]),
            }
        return attributes

    def _send(self, message: Message) -> SendResult:
        if not message.to:
            return SendResult(
                message.delivery_id,
                False,
                error="No phone number to send to.",
                invalid_address=True,
            )
        text = message.content.get("text")
        if not text:
            return SendResult.failed(message.delivery_id, "The SMS has no text.")
        try:
            response = self.client.publish(
                PhoneNumber=message.to,
                Message=str(text),
                MessageAttributes=self._attributes(),
            )
        except botocore.exceptions.ClientError as exc:
            return self._client_error(message, exc)
        except (
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectionClosedError,
        ) as exc:
            return SendResult.failed(message.delivery_id, f"SNS: {exc}", transient=True)
        except botocore.exceptions.ConnectionError as exc:
            # EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError.
            raise ProviderUnavailable(f"cannot connect to SNS: {exc}") from exc
        except botocore.exceptions.HTTPClientError as exc:
            return SendResult.failed(message.delivery_id, f"SNS: {exc}", transient=True)
        except botocore.exceptions.NoCredentialsError as exc:
            raise ProviderUnavailable(f"SNS: {exc}") from exc
        return SendResult.sent(message.delivery_id, response.get("MessageId"))

    def _client_error(self, message: Message, exc: botocore.exceptions.ClientError) -> SendResult:
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "")
        detail = str(error.get("Message") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        text = f"SNS error {code or status}: {detail}".rstrip(": ")
        if code in AUTH_CODES or status in (401, 403):
            raise ProviderUnavailable(text)
        if code in THROTTLING_CODES or status == 429 or status >= 500:
            return SendResult.failed(message.delivery_id, text, transient=True)
        about_number = code in INVALID_PARAMETER_CODES and re.search(
            r"phone ?number|E\.?164", detail, re.IGNORECASE
        )
        return SendResult(
            message.delivery_id, False, error=text, invalid_address=bool(about_number)
        )
