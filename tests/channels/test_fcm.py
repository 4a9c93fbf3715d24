"""FCM provider against a local server playing Google's OAuth token endpoint and FCM v1."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.channels.push_server import PushServer, Reply, Request, free_port, json_reply
from whistle_web.channels.base import Message, ProviderUnavailable, provider_class
from whistle_web.channels.fcm import SCOPE, FcmProvider
from whistle_web.channels.kinds import Channel, ProviderKind

PROJECT = "whistle-demo"
SEND_PATH = f"/v1/projects/{PROJECT}/messages:send"
CLIENT_EMAIL = "whistle@whistle-demo.iam.gserviceaccount.com"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class FakeGoogle:
    """Token endpoint at /token, FCM at /v1/...; FCM answers per device token."""

    def __init__(self, server: PushServer, public_key: rsa.RSAPublicKey) -> None:
        self.server = server
        self.public_key = public_key
        self.expires_in = 3600
        self.token_reply: Reply | None = None
        # Device token -> reply; any other token is accepted.
        self.replies: dict[str, Reply | None] = {}
        self.issued: list[str] = []
        server.responder = self.respond

    @property
    def token_url(self) -> str:
        return f"{self.server.url}/token"

    def token_requests(self) -> list[Request]:
        return self.server.requests_to("/token")

    def fcm_requests(self) -> list[Request]:
        return self.server.requests_to(SEND_PATH)

    def respond(self, request: Request) -> Reply | None:
        if request.path == "/token":
            return self._token(request)
        if request.path != SEND_PATH or request.method != "POST":
            return json_reply(404, {"error": {"code": 404, "status": "NOT_FOUND"}})
        if request.headers.get("authorization") not in [f"Bearer {t}" for t in self.issued]:
            return json_reply(401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}})
        device = request.json()["message"]["token"]
        if device in self.replies:
            return self.replies[device]
        return json_reply(200, {"name": f"projects/{PROJECT}/messages/{device}-id"})

    def _token(self, request: Request) -> Reply:
        if self.token_reply is not None:
            return self.token_reply
        form = parse_qs(request.body.decode())
        try:
            assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
            claims = jwt.decode(
                form["assertion"][0],
                self.public_key,
                algorithms=["RS256"],
                audience=self.token_url,
                issuer=CLIENT_EMAIL,
            )
            assert claims["scope"] == SCOPE
        except (AssertionError, KeyError, jwt.InvalidTokenError) as exc:
            return json_reply(400, {"error": "invalid_grant", "error_description": repr(exc)})
        token = f"ya29.test-{len(self.issued)}"
        self.issued.append(token)
        return json_reply(
            200, {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        )


@pytest.fixture
def server() -> Iterator[PushServer]:
    with PushServer() as server:
        yield server


@pytest.fixture
def google(server: PushServer, rsa_key: rsa.RSAPrivateKey) -> FakeGoogle:
    return FakeGoogle(server, rsa_key.public_key())


def service_account(key: Any, token_uri: str) -> dict[str, str]:
    return {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "key-1",
        "private_key": _pem(key),
        "client_email": CLIENT_EMAIL,
        "client_id": "1234567890",
        "token_uri": token_uri,
    }


def make_provider(
    google: FakeGoogle, key: Any, *, as_text: bool = True, **settings: Any
) -> FcmProvider:
    account = service_account(key, "https://oauth2.googleapis.com/token")
    return FcmProvider(
        {
            "project_id": PROJECT,
            "base_url": google.server.url,
            "token_uri": google.token_url,
            "timeout": 5,
            **settings,
        },
        {"service_account_json": json.dumps(account) if as_text else account},
    )


def push(delivery_id: int, token: str, **content: Any) -> Message:
    content = {"title": f"Title {delivery_id}", "body": f"Body {delivery_id}", **content}
    return Message(delivery_id, Channel.PUSH, token, content)


def test_registered() -> None:
    assert provider_class(ProviderKind.FCM) is FcmProvider
    assert provider_class("fcm") is FcmProvider


@pytest.mark.parametrize("as_text", [True, False], ids=["json-text", "dict"])
def test_batch_fetches_one_token_and_sends_exact_requests(
    google: FakeGoogle, rsa_key: rsa.RSAPrivateKey, as_text: bool
) -> None:
    messages = [
        push(1, "device-a", data={"order": "42", "count": 3, "nested": {"x": [1]}}),
        push(2, "device-b", image="https://cdn.example.com/a.png"),
        push(3, "device-c"),
    ]
    before = int(time.time())
    with make_provider(google, rsa_key, as_text=as_text) as provider:
        results = provider.send_batch(messages)

    assert [(r.delivery_id, r.ok, r.provider_message_id) for r in results] == [
        (1, True, f"projects/{PROJECT}/messages/device-a-id"),
        (2, True, f"projects/{PROJECT}/messages/device-b-id"),
        (3, True, f"projects/{PROJECT}/messages/device-c-id"),
    ]
    assert not any(r.error or r.transient or r.invalid_address for r in results)

    # One token exchange for the whole batch, with a correctly signed assertion.
    [token_request] = google.token_requests()
    assert token_request.method == "POST"
    assert token_request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = parse_qs(token_request.body.decode())
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    assertion = form["assertion"][0]
    assert jwt.get_unverified_header(assertion) == {"alg": "RS256", "typ": "JWT", "kid": "key-1"}
    claims = jwt.decode(
        assertion, rsa_key.public_key(), algorithms=["RS256"], audience=google.token_url
    )
    assert claims["iss"] == CLIENT_EMAIL
    assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
    assert claims["aud"] == google.token_url
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] == claims["iat"] + 3600

    fcm = google.fcm_requests()
    assert [r.path for r in fcm] == [SEND_PATH] * 3
    assert all(r.method == "POST" for r in fcm)
    assert all(r.headers["authorization"] == "Bearer ya29.test-0" for r in fcm)
    assert all(r.headers["content-type"] == "application/json" for r in fcm)
    assert [r.json() for r in fcm] == [
        {
            "message": {
                "token": "device-a",
                "notification": {"title": "Title 1", "body": "Body 1"},
                "data": {"order": "42", "count": "3", "nested": '{"x": [1]}'},
            }
        },
        {
            "message": {
                "token": "device-b",
                "notification": {
                    "title": "Title 2",
                    "body": "Body 2",
                    "image": "https://cdn.example.com/a.png",
                },
            }
        },
        {
            "message": {
                "token": "device-c",
                "notification": {"title": "Title 3", "body": "Body 3"},
            }
        },
    ]
    # One HTTP client, one kept-alive connection for the token and all three sends.
    assert len({r.client_port for r in google.server.requests}) == 1


def test_token_is_reused_across_batches_until_near_expiry(
    google: FakeGoogle, rsa_key: rsa.RSAPrivateKey
) -> None:
    with make_provider(google, rsa_key) as provider:
        provider.send_batch([push(1, "a"), push(2, "b")])
        provider.send_batch([push(3, "c")])
        assert len(google.token_requests()) == 1

    google.expires_in = 0  # already expired when it arrives: fetched again for each send
    with make_provider(google, rsa_key) as provider:
        results = provider.send_batch([push(4, "d"), push(5, "e")])
    assert all(r.ok for r in results)
    assert len(google.token_requests()) == 3
    assert [r.headers["authorization"] for r in google.fcm_requests()[-2:]] == [
        "Bearer ya29.test-1",
        "Bearer ya29.test-2",
    ]


def _error(status: int, grpc_status: str, message: str, *details: dict[str, Any]) -> Reply:
    return json_reply(
        status,
        {
            "error": {
                "code": status,
                "message": message,
                "status": grpc_status,
                "details": list(details),
            }
        },
    )


FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


@pytest.mark.parametrize(
    ("reply", "transient", "invalid_address", "mentions"),
    [
        pytest.param(
            _error(
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                {"@type": FCM_ERROR, "errorCode": "UNREGISTERED"},
            ),
            False,
            True,
            "UNREGISTERED",
            id="404-unregistered",
        ),
        pytest.param(
            _error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                {"@type": FCM_ERROR, "errorCode": "INVALID_ARGUMENT"},
            ),
            False,
            True,
            "registration token",
            id="400-invalid-token-message",
        ),
        pytest.param(
            _error(
                400,
                "INVALID_ARGUMENT",
                "Request contains an invalid argument.",
                {"@type": BAD_REQUEST, "fieldViolations": [{"field": "message.token"}]},
            ),
            False,
            True,
            "INVALID_ARGUMENT",
            id="400-token-field-violation",
        ),
        pytest.param(
            _error(
                400,
                "INVALID_ARGUMENT",
                "Invalid data payload key: from",
                {"@type": BAD_REQUEST, "fieldViolations": [{"field": "message.data"}]},
            ),
            False,
            False,
            "Invalid data payload key",
            id="400-not-about-the-token",
        ),
        pytest.param(
            _error(404, "NOT_FOUND", "Requested entity was not found."),
            False,
            False,
            "NOT_FOUND",
            id="404-without-unregistered",
        ),
        pytest.param(
            _error(
                403,
                "PERMISSION_DENIED",
                "SenderId mismatch",
                {"@type": FCM_ERROR, "errorCode": "SENDER_ID_MISMATCH"},
            ),
            False,
            False,
            "SENDER_ID_MISMATCH",
            id="403-sender-id-mismatch",
        ),
        pytest.param(
            _error(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded.",
                {"@type": FCM_ERROR, "errorCode": "QUOTA_EXCEEDED"},
            ),
            True,
            False,
            "QUOTA_EXCEEDED",
            id="429",
        ),
        pytest.param(
            _error(503, "UNAVAILABLE", "The service is currently unavailable."),
            True,
            False,
            "UNAVAILABLE",
            id="503",
        ),
        pytest.param(
            _error(500, "INTERNAL", "Internal error encountered."),
            True,
            False,
            "INTERNAL",
            id="500",
        ),
        pytest.param(Reply(502, b"<html>Bad Gateway</html>"), True, False, "502", id="502-html"),
    ],
)
def test_error_mapping(
    google: FakeGoogle,
    rsa_key: rsa.RSAPrivateKey,
    reply: Reply,
    transient: bool,
    invalid_address: bool,
    mentions: str,
) -> None:
    google.replies["bad"] = reply
    with make_provider(google, rsa_key) as provider:
        first, failed, last = provider.send_batch(
            [push(1, "ok-1"), push(2, "bad"), push(3, "ok-2")]
        )
    assert first.ok and last.ok
    assert not failed.ok
    assert failed.delivery_id == 2
    assert failed.transient is transient
    assert failed.invalid_address is invalid_address
    assert failed.error and mentions in failed.error
    assert len(google.token_requests()) == 1


def test_retry_after_is_kept_in_the_error(google: FakeGoogle, rsa_key: rsa.RSAPrivateKey) -> None:
    google.replies["busy"] = json_reply(
        429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}, {"Retry-After": "30"}
    )
    with make_provider(google, rsa_key) as provider:
        [result] = provider.send_batch([push(1, "busy")])
    assert result.transient
    assert "Retry-After: 30" in (result.error or "")


@pytest.mark.parametrize(
    "reply",
    [
        _error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
        _error(403, "PERMISSION_DENIED", "Permission 'cloudmessaging.messages.create' denied"),
    ],
    ids=["401", "403"],
)
def test_auth_refused_makes_the_provider_unavailable(
    google: FakeGoogle, rsa_key: rsa.RSAPrivateKey, reply: Reply
) -> None:
    google.replies["a"] = reply
    with make_provider(google, rsa_key) as provider, pytest.raises(ProviderUnavailable) as info:
        provider.send_batch([push(1, "a"), push(2, "b")])
    assert str(reply.status) in str(info.value)
    # It stops at the first refusal instead of trying the rest.
    assert len(google.fcm_requests()) == 1


def test_auth_refused_after_a_send_fails_the_rest_as_transient(
    google: FakeGoogle, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Raising would make the worker resend message 1 through another provider."""
    google.replies["b"] = _error(401, "UNAUTHENTICATED", "Token revoked.")
    with make_provider(google, rsa_key) as provider:
        results = provider.send_batch([push(1, "a"), push(2, "b"), push(3, "c")])
    assert [(r.ok, r.transient) for r in results] == [(True, False), (False, True), (False, True)]
    assert "401" in (results[1].error or "")
    assert len(google.fcm_requests()) == 2


def test_refused_token_exchange_makes_the_provider_unavailable(
    google: FakeGoogle, rsa_key: rsa.RSAPrivateKey
) -> None:
    google.token_reply = json_reply(
        400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
    )
    with make_provider(google, rsa_key) as provider, pytest.raises(ProviderUnavailable) as info:
        provider.send_batch([push(1, "a")])
    assert "invalid_grant" in str(info.value)
    assert google.fcm_requests() == []


def test_assertion_signed_with_the_wrong_key_is_refused(google: FakeGoogle) -> None:
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with make_provider(google, other_key) as provider, pytest.raises(ProviderUnavailable):
        provider.send_batch([push(1, "a")])
    assert len(google.token_requests()) == 1
    assert google.fcm_requests() == []


def test_token_response_without_access_token(
    google: FakeGoogle, rsa_key: rsa.RSAPrivateKey
) -> None:
    google.token_reply = json_reply(200, {"token_type": "Bearer"})
    with make_provider(google, rsa_key) as provider, pytest.raises(ProviderUnavailable):
        provider.send_batch([push(1, "a")])


def test_connection_refused_makes_the_provider_unavailable(
    google: FakeGoogle, rsa_key: rsa.RSAPrivateKey
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with (
        make_provider(google, rsa_key, token_uri=f"{dead}/token") as provider,
        pytest.raises(ProviderUnavailable, match="Token exchange failed"),
    ):
        provider.send_batch([push(1, "a")])

    # The token endpoint answers but FCM itself is unreachable.
    with (
        make_provider(google, rsa_key, base_url=dead) as provider,
        pytest.raises(ProviderUnavailable, match="Cannot connect"),
    ):
        provider.send_batch([push(1, "a")])
    assert len(google.token_requests()) == 1


def test_timeouts_are_transient_and_stop_the_batch_after_three(
    google: FakeGoogle, rsa_key: rsa.RSAPrivateKey
) -> None:
    def hang(request: Request) -> Reply | None:
        google.server.hold()
        return None

    for device in ("a", "b", "c", "d", "e"):
        google.replies[device] = Reply(200)  # never used: the hang below answers first
    original = google.respond
    google.server.responder = lambda r: hang(r) if r.path == SEND_PATH else original(r)

    started = time.monotonic()
    with make_provider(google, rsa_key, timeout=0.3) as provider:
        results = provider.send_batch([push(i, d) for i, d in enumerate("abcde", 1)])
    elapsed = time.monotonic() - started

    assert [(r.ok, r.transient) for r in results] == [(False, True)] * 5
    assert all("timeout" in (r.error or "").lower() for r in results[:3])
    assert all("timed out 3 times" in (r.error or "") for r in results[3:])
    assert len(google.fcm_requests()) == 3
    assert elapsed < 5  # not held until the server stops (10 s)


def test_dropped_connection_is_transient(google: FakeGoogle, rsa_key: rsa.RSAPrivateKey) -> None:
    google.replies["gone"] = None  # the server hangs up without answering
    with make_provider(google, rsa_key) as provider:
        results = provider.send_batch([push(1, "gone"), push(2, "fine")])
    assert (results[0].ok, results[0].transient) == (False, True)
    assert results[1].ok


def test_close_releases_the_client(google: FakeGoogle, rsa_key: rsa.RSAPrivateKey) -> None:
    provider = make_provider(google, rsa_key)
    provider.send_batch([push(1, "a")])
    client = provider._client
    assert client is not None
    provider.close()
    assert client.is_closed
    provider.close()  # idempotent


# -- validate -----------------------------------------------------------------------------


def _fields(settings: dict[str, Any], credentials: dict[str, Any]) -> dict[str, str]:
    return {e.field: e.message for e in FcmProvider.validate(settings, credentials)}


def test_validate_accepts_a_good_configuration(rsa_key: rsa.RSAPrivateKey) -> None:
    account = service_account(rsa_key, "https://oauth2.googleapis.com/token")
    assert _fields({"project_id": PROJECT}, {"service_account_json": json.dumps(account)}) == {}
    assert _fields({"project_id": PROJECT, "timeout": 2.5}, {"service_account_json": account}) == {}


def test_validate_requires_project_and_service_account() -> None:
    assert set(_fields({}, {})) == {"settings.project_id", "credentials.service_account_json"}


@pytest.mark.parametrize(
    ("mutate", "mentions"),
    [
        (lambda account: "{not json", "does not parse"),
        (lambda account: json.dumps([account]), "JSON object"),
        (lambda account: {**account, "client_email": ""}, "client_email"),
        (lambda account: {k: v for k, v in account.items() if k != "token_uri"}, "token_uri"),
        (lambda account: {**account, "private_key": "-----BEGIN nonsense"}, "PEM"),
        (
            lambda account: {
                **account,
                "private_key": _pem(ec.generate_private_key(ec.SECP256R1())),
            },
            "RSA",
        ),
        (lambda account: {**account, "token_uri": "oauth2.googleapis.com"}, "token_uri"),
    ],
    ids=[
        "not-json",
        "not-object",
        "no-client-email",
        "no-token-uri",
        "bad-pem",
        "not-rsa",
        "token-uri-not-url",
    ],
)
def test_validate_rejects_bad_service_accounts(
    rsa_key: rsa.RSAPrivateKey, mutate: Any, mentions: str
) -> None:
    account = mutate(service_account(rsa_key, "https://oauth2.googleapis.com/token"))
    errors = _fields({"project_id": PROJECT}, {"service_account_json": account})
    assert list(errors) == ["credentials.service_account_json"]
    assert mentions in errors["credentials.service_account_json"]


def test_validate_rejects_bad_settings(rsa_key: rsa.RSAPrivateKey) -> None:
    account = service_account(rsa_key, "https://oauth2.googleapis.com/token")
    errors = _fields(
        {"project_id": "a/b", "base_url": "ftp://x", "token_uri": "nope", "timeout": -1},
        {"service_account_json": account},
    )
    assert set(errors) == {
        "settings.project_id",
        "settings.base_url",
        "settings.token_uri",
        "settings.timeout",
    }
