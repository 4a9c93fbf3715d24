"""Firebase Cloud Messaging over the HTTP v1 API.

Authentication is a Google service account: the provider signs an OAuth 2.0 JWT assertion
with the account's RSA key, exchanges it at the token endpoint for an access token, and keeps
that token for the life of the provider object (one batch), so a batch costs one token
request. One httpx client per provider object carries every request of the batch.

Result mapping:

* 200: sent; the provider message id is the response's ``name``.
* 404 ``UNREGISTERED``, or 400 ``INVALID_ARGUMENT`` about the registration token: permanent,
  ``invalid_address`` (the worker disables the device).
* 429, 500, 503, timeouts, a dropped connection: transient.
* 401/403, a failed token exchange, a refused connection: the provider as a whole is
  unusable; :class:`ProviderUnavailable` while nothing of the batch has been sent yet,
  otherwise the rest of the batch fails as transient (raising would make the worker send
  the already-delivered messages again through another provider).
* Anything else (another 400, 404 without ``UNREGISTERED``, 403 ``SENDER_ID_MISMATCH``):
  permanent, the device is left alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from whistle_web.channels.base import (
    BaseProvider,
    Message,
    ProviderUnavailable,
    SendResult,
    register,
)
from whistle_web.channels.kinds import ProviderKind
from whistle_web.errors import FieldError

DEFAULT_BASE_URL = "https://fcm.googleapis.com"
DEFAULT_TIMEOUT = 10.0
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600
# Renew the access token this long before Google says it expires (at most half its life).
TOKEN_RENEW_MARGIN = 300.0
# After this many timeouts in a row the rest of the batch is failed as transient unsent,
# so a hanging FCM cannot hold a worker for (batch size x timeout).
MAX_CONSECUTIVE_TIMEOUTS = 3
SERVICE_ACCOUNT_FIELDS = ("client_email", "private_key", "token_uri")


class _Unusable(Exception):
    """The provider cannot send (auth refused, unreachable); see the module docstring."""


def parse_service_account(value: Any) -> dict[str, Any]:
    """The service account as a dict, from the JSON text Google issues or an already-parsed dict.

    Raises:
        ValueError: not JSON, not an object, or a required field is missing.
    """
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError("The service account JSON does not parse.") from exc
    if not isinstance(value, dict):
        raise ValueError("The service account must be a JSON object.")
    missing = [key for key in SERVICE_ACCOUNT_FIELDS if not value.get(key)]
    if missing:
        raise ValueError(f"The service account JSON lacks {', '.join(missing)}.")
    return value


def _load_rsa_key(pem: Any) -> rsa.RSAPrivateKey:
    if not isinstance(pem, str):
        raise ValueError("The service account private_key is not a PEM private key.")
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("The service account private_key is not a PEM private key.") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("The service account private_key is not an RSA key.")
    return key


def _is_http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _timeout(settings: dict[str, Any]) -> float:
    value = settings.get("timeout")
    return DEFAULT_TIMEOUT if value in (None, "") else float(value)


@register
class FcmProvider(BaseProvider):
    kind = ProviderKind.FCM
    required_settings = ("project_id",)
    required_credentials = ("service_account_json",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: httpx.Client | None = None
        self._access_token: str | None = None
        self._token_valid_until = 0.0
        self._private_key: rsa.RSAPrivateKey | None = None

    # -- configuration -------------------------------------------------------------------

    @classmethod
    def validate(cls, settings: dict[str, Any], credentials: dict[str, Any]) -> list[FieldError]:
        errors = super().validate(settings, credentials)
        project_id = settings.get("project_id")
        if project_id not in (None, "") and (
            not isinstance(project_id, str) or "/" in project_id or project_id != project_id.strip()
        ):
            errors.append(FieldError("settings.project_id", "Not a Firebase project ID."))
        for key in ("base_url", "token_uri"):
            if settings.get(key) not in (None, "") and not _is_http_url(settings[key]):
                errors.append(FieldError(f"settings.{key}", "Must be an http(s) URL."))
        try:
            if _timeout(settings) <= 0:
                raise ValueError
        except (TypeError, ValueError):
            errors.append(FieldError("settings.timeout", "Must be a positive number of seconds."))
        raw = credentials.get("service_account_json")
        if raw not in (None, ""):
            try:
                account = parse_service_account(raw)
                _load_rsa_key(account["private_key"])
                if not _is_http_url(account["token_uri"]):
                    raise ValueError("The service account token_uri is not an http(s) URL.")
            except ValueError as exc:
                errors.append(FieldError("credentials.service_account_json", str(exc)))
        return errors

    @property
    def _base_url(self) -> str:
        return (self.settings.get("base_url") or DEFAULT_BASE_URL).rstrip("/")

    @property
    def _send_url(self) -> str:
        project = quote(str(self.settings["project_id"]), safe="")
        return f"{self._base_url}/v1/projects/{project}/messages:send"

    # -- connection and token ------------------------------------------------------------

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(timeout=_timeout(self.settings))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _token(self) -> str:
        """A cached access token, fetched when missing or about to expire.

        Raises:
            _Unusable: the service account is unusable or the exchange failed.
        """
        if self._access_token and time.monotonic() < self._token_valid_until:
            return self._access_token
        try:
            account = parse_service_account(self.credentials.get("service_account_json"))
            if self._private_key is None:
                self._private_key = _load_rsa_key(account["private_key"])
        except ValueError as exc:
            raise _Unusable(str(exc)) from exc
        token_uri = self.settings.get("token_uri") or account["token_uri"]
        now = int(time.time())
        claims = {
            "iss": account["client_email"],
            "scope": SCOPE,
            "aud": token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        headers = {"kid": account["private_key_id"]} if account.get("private_key_id") else None
        assertion = jwt.encode(claims, self._private_key, algorithm="RS256", headers=headers)
        started = time.monotonic()
        try:
            response = self._http().post(
                token_uri, data={"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
            )
        except httpx.HTTPError as exc:
            raise _Unusable(f"Token exchange failed: {_describe(exc)}") from exc
        if response.status_code != 200:
            raise _Unusable(
                f"Token exchange refused: HTTP {response.status_code} {_oauth_error(response)}"
            )
        try:
            body = response.json()
            access_token = body["access_token"]
            expires_in = float(body.get("expires_in", ASSERTION_LIFETIME))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _Unusable("Token exchange returned no access_token.") from exc
        if not isinstance(access_token, str) or not access_token:
            raise _Unusable("Token exchange returned no access_token.")
        self._access_token = access_token
        margin = min(TOKEN_RENEW_MARGIN, expires_in / 2)
        self._token_valid_until = started + expires_in - margin
        return access_token

    # -- sending -------------------------------------------------------------------------

    def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        results: list[SendResult] = []
        timeouts_in_a_row = 0
        for index, message in enumerate(messages):
            try:
                result, timed_out = self._send_one(message)
            except _Unusable as exc:
                if not any(r.ok for r in results):
                    raise ProviderUnavailable(f"FCM: {exc}") from exc
                error = f"FCM unavailable mid-batch: {exc}"
                return results + [
                    SendResult.failed(m.delivery_id, error, transient=True)
                    for m in messages[index:]
                ]
            results.append(result)
            timeouts_in_a_row = timeouts_in_a_row + 1 if timed_out else 0
            if timeouts_in_a_row >= MAX_CONSECUTIVE_TIMEOUTS:
                error = f"Not sent: FCM timed out {timeouts_in_a_row} times in a row."
                return results + [
                    SendResult.failed(m.delivery_id, error, transient=True)
                    for m in messages[index + 1 :]
                ]
        return results

    def _payload(self, message: Message) -> dict[str, Any]:
        content = message.content
        notification = {"title": content.get("title") or "", "body": content.get("body") or ""}
        if content.get("image"):
            notification["image"] = content["image"]
        body: dict[str, Any] = {"token": message.to, "notification": notification}
        data = content.get("data")
        if data:
            # FCM data values must be strings; structured values travel as JSON.
            body["data"] = {
                str(key): value if isinstance(value, str) else json.dumps(value)
                for key, value in data.items()
            }
        return {"message": body}

    def _send_one(self, message: Message) -> tuple[SendResult, bool]:
        """The message's result, and whether the request timed out."""
        token = self._token()
        try:
            response = self._http().post(
                self._send_url,
                json=self._payload(message),
                headers={"Authorization": f"Bearer {token}"},
            )
        except httpx.TimeoutException as exc:
            error = f"FCM timeout: {_describe(exc)}"
            return SendResult.failed(message.delivery_id, error, transient=True), True
        except httpx.ConnectError as exc:
            raise _Unusable(f"Cannot connect: {_describe(exc)}") from exc
        except httpx.TransportError as exc:
            error = f"FCM connection lost: {_describe(exc)}"
            return SendResult.failed(message.delivery_id, error, transient=True), False
        return self._result(message, response), False

    def _result(self, message: Message, response: httpx.Response) -> SendResult:
        status = response.status_code
        if status == 200:
            try:
                name = response.json().get("name")
            except (ValueError, AttributeError):
                name = None
            return SendResult.sent(message.delivery_id, name if isinstance(name, str) else None)
        error = _FcmError.from_response(response)
        text = f"FCM HTTP {status} {error}"
        if status == 404 and error.fcm_code == "UNREGISTERED":
            return _invalid(message, text)
        if status == 400 and error.about_token:
            return _invalid(message, text)
        if status in (401, 403) and error.fcm_code not in (
            "SENDER_ID_MISMATCH",
            "THIRD_PARTY_AUTH_ERROR",
        ):
            if status == 401:
                self._access_token = None
            raise _Unusable(text)
        if status == 429 or status >= 500:
            retry_after = response.headers.get("Retry-After")
            if retry_after:
                text += f" (Retry-After: {retry_after})"
            return SendResult.failed(message.delivery_id, text, transient=True)
        return SendResult.failed(message.delivery_id, text)


def _invalid(message: Message, error: str) -> SendResult:
    return SendResult(message.delivery_id, False, error=error, invalid_address=True)


class _FcmError:
    """The interesting parts of a google.rpc error body."""

    def __init__(self, status: str, message: str, fcm_code: str, fields: list[str]) -> None:
        self.status = status
        self.message = message
        self.fcm_code = fcm_code
        self.fields = fields

    @classmethod
    def from_response(cls, response: httpx.Response) -> _FcmError:
        try:
            error = response.json()["error"]
            if not isinstance(error, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return cls("", response.text[:200].strip(), "", [])
        fcm_code = ""
        fields: list[str] = []
        for detail in error.get("details") or []:
            if not isinstance(detail, dict):
                continue
            if detail.get("errorCode"):
                fcm_code = str(detail["errorCode"])
            for violation in detail.get("fieldViolations") or []:
                if isinstance(violation, dict) and violation.get("field"):
                    fields.append(str(violation["field"]))
        return cls(
            str(error.get("status") or ""), str(error.get("message") or ""), fcm_code, fields
        )

    @property
    def about_token(self) -> bool:
        if self.status != "INVALID_ARGUMENT" and self.fcm_code != "INVALID_ARGUMENT":
            return False
        if "message.token" in self.fields:
            return True
        return "registration token" in self.message.lower()

    def __str__(self) -> str:
        code = self.fcm_code or self.status
        return f"{code}: {self.message}" if code else self.message


def _oauth_error(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body.get('error', '')}: {body.get('error_description', '')}".strip(": ")
    except (ValueError, AttributeError):
        return response.text[:200].strip()


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
