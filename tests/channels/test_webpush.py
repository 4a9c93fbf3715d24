"""Web Push provider against a local push service that checks VAPID and decrypts payloads."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import http_ece
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.channels.push_server import PushServer, Reply, Request, free_port
from whistle_web.channels.base import Message, ProviderUnavailable, provider_class
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.channels.webpush import WebPushProvider

SUBJECT = "mailto:push@whistle.example"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_raw(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


@pytest.fixture(scope="module")
def vapid_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def raw_private(key: ec.EllipticCurvePrivateKey) -> str:
    return b64url(key.private_numbers().private_value.to_bytes(32, "big"))


@dataclass
class Subscriber:
    """A browser's side of a subscription: its ECDH key and auth secret."""

    endpoint: str
    key: ec.EllipticCurvePrivateKey
    auth: bytes

    @classmethod
    def new(cls, endpoint: str) -> Subscriber:
        return cls(endpoint, ec.generate_private_key(ec.SECP256R1()), os.urandom(16))

    @property
    def keys(self) -> dict[str, str]:
        return {"p256dh": b64url(public_raw(self.key)), "auth": b64url(self.auth)}

    def decrypt(self, body: bytes) -> Any:
        plain = http_ece.decrypt(
            body, private_key=self.key, auth_secret=self.auth, version="aes128gcm"
        )
        return json.loads(plain)


def push_service(replies: dict[str, Reply | None]) -> Any:
    """Answer 201 with a Location per subscription, or the reply set for that path."""

    def respond(request: Request) -> Reply | None:
        if request.path in replies:
            return replies[request.path]
        return Reply(201, headers={"Location": f"/messages/{request.path.rsplit('/', 1)[1]}"})

    return respond


@pytest.fixture
def replies() -> dict[str, Reply | None]:
    return {}


@pytest.fixture
def server(replies: dict[str, Reply | None]) -> Iterator[PushServer]:
    with PushServer(push_service(replies)) as server:
        yield server


def make_provider(key: str, **settings: Any) -> WebPushProvider:
    return WebPushProvider(
        {"vapid_subject": SUBJECT, "timeout": 5, **settings}, {"vapid_private_key": key}
    )


def push(delivery_id: int, subscriber: Subscriber, **content: Any) -> Message:
    content = {"title": f"Title {delivery_id}", "body": f"Body {delivery_id}", **content}
    return Message(
        delivery_id, Channel.PUSH, subscriber.endpoint, content, meta={"keys": subscriber.keys}
    )


def check_vapid(request: Request, vapid_key: ec.EllipticCurvePrivateKey, audience: str) -> dict:
    scheme, _, params = request.headers["authorization"].partition(" ")
    assert scheme == "vapid"
    parts = dict(item.split("=", 1) for item in params.split(","))
    assert set(parts) == {"t", "k"}
    assert b64url_decode(parts["k"]) == public_raw(vapid_key)
    claims = jwt.decode(parts["t"], vapid_key.public_key(), algorithms=["ES256"], audience=audience)
    assert claims["sub"] == SUBJECT
    assert time.time() < claims["exp"] <= time.time() + 24 * 3600
    return claims


def test_registered() -> None:
    assert provider_class(ProviderKind.WEBPUSH) is WebPushProvider
    assert provider_class("webpush") is WebPushProvider


@pytest.mark.parametrize("key_format", ["pem", "raw"])
def test_batch_is_signed_encrypted_and_sent(
    server: PushServer, vapid_key: ec.EllipticCurvePrivateKey, key_format: str
) -> None:
    key = pem(vapid_key) if key_format == "pem" else raw_private(vapid_key)
    subscribers = [Subscriber.new(f"{server.url}/push/sub-{i}") for i in range(3)]
    messages = [
        push(1, subscribers[0], url="https://app.example.com/orders/42", data={"order": 42}),
        push(2, subscribers[1], title="Grüße ✓", body="Ünïcode body"),
        push(3, subscribers[2]),
    ]
    with make_provider(key, ttl=3600) as provider:
        results = provider.send_batch(messages)

    assert [(r.delivery_id, r.ok, r.provider_message_id) for r in results] == [
        (1, True, "/messages/sub-0"),
        (2, True, "/messages/sub-1"),
        (3, True, "/messages/sub-2"),
    ]
    assert [r.path for r in server.requests] == ["/push/sub-0", "/push/sub-1", "/push/sub-2"]
    expected = [
        {
            "title": "Title 1",
            "body": "Body 1",
            "url": "https://app.example.com/orders/42",
            "data": {"order": 42},
        },
        {"title": "Grüße ✓", "body": "Ünïcode body"},
        {"title": "Title 3", "body": "Body 3"},
    ]
    for request, subscriber, payload in zip(server.requests, subscribers, expected, strict=True):
        assert request.method == "POST"
        assert request.headers["content-encoding"] == "aes128gcm"
        assert request.headers["ttl"] == "3600"
        claims = check_vapid(request, vapid_key, audience=server.origin)
        assert claims["aud"] == server.origin
        assert subscriber.decrypt(request.body) == payload
    # Each payload is encrypted for its own subscriber only.
    with pytest.raises(http_ece.ECEException):
        subscribers[1].decrypt(server.requests[0].body)
    # One requests session: the three pushes share one kept-alive connection.
    assert len({r.client_port for r in server.requests}) == 1


def test_default_ttl_and_audience_per_push_service(
    server: PushServer, vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    with PushServer(push_service({})) as other:
        a = Subscriber.new(f"{server.url}/push/a")
        b = Subscriber.new(f"{other.url}/push/b")
        with make_provider(pem(vapid_key)) as provider:
            results = provider.send_batch([push(1, a), push(2, b), push(3, a)])
        assert all(r.ok for r in results)
        # The audience follows each endpoint's origin, not the first one signed for.
        for request in server.requests:
            check_vapid(request, vapid_key, audience=server.origin)
        [request_b] = other.requests
        check_vapid(request_b, vapid_key, audience=other.origin)
        assert b.decrypt(request_b.body) == {"title": "Title 2", "body": "Body 2"}
    assert [r.headers["ttl"] for r in server.requests] == ["86400", "86400"]


@pytest.mark.parametrize(
    ("reply", "transient", "invalid_address", "mentions"),
    [
        (Reply(410, b"push subscription has unsubscribed or expired."), False, True, "410"),
        (Reply(404, b"Not Found"), False, True, "404"),
        (Reply(429, b"slow down", {"Retry-After": "60"}), True, False, "Retry-After: 60"),
        (Reply(500, b"oops"), True, False, "500"),
        (Reply(503), True, False, "503"),
        (Reply(413, b"payload too large"), False, False, "413"),
        (Reply(400, b"bad request"), False, False, "400"),
        (Reply(403, b"VAPID key mismatch"), False, False, "VAPID key mismatch"),
    ],
    ids=["410", "404", "429", "500", "503", "413", "400", "403"],
)
def test_error_mapping(
    server: PushServer,
    replies: dict[str, Reply | None],
    vapid_key: ec.EllipticCurvePrivateKey,
    reply: Reply,
    transient: bool,
    invalid_address: bool,
    mentions: str,
) -> None:
    replies["/push/bad"] = reply
    subscribers = [Subscriber.new(f"{server.url}/push/{name}") for name in ("ok", "bad", "ok2")]
    with make_provider(pem(vapid_key)) as provider:
        first, failed, last = provider.send_batch(
            [push(i, s) for i, s in enumerate(subscribers, 1)]
        )
    assert first.ok and last.ok
    assert not failed.ok
    assert failed.transient is transient
    assert failed.invalid_address is invalid_address
    assert mentions in (failed.error or "")


def test_missing_or_broken_keys_fail_permanently_without_a_request(
    server: PushServer, vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    good = Subscriber.new(f"{server.url}/push/good")
    endpoint = f"{server.url}/push/x"
    messages = [
        Message(1, Channel.PUSH, endpoint, {"title": "t", "body": "b"}),
        Message(2, Channel.PUSH, endpoint, {"title": "t", "body": "b"}, meta={"keys": {}}),
        Message(
            3,
            Channel.PUSH,
            endpoint,
            {"title": "t", "body": "b"},
            meta={"keys": {"p256dh": "not-a-point", "auth": b64url(os.urandom(16))}},
        ),
        push(4, good),
    ]
    with make_provider(pem(vapid_key)) as provider:
        results = provider.send_batch(messages)
    for result in results[:3]:
        assert (result.ok, result.transient, result.invalid_address) == (False, False, False)
    assert "keys missing" in (results[0].error or "")
    assert "keys missing" in (results[1].error or "")
    assert "unusable" in (results[2].error or "")
    assert results[3].ok
    assert [r.path for r in server.requests] == ["/push/good"]


def test_timeout_and_refused_connection_are_transient(
    server: PushServer, replies: dict[str, Reply | None], vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    hanging = Subscriber.new(f"{server.url}/push/hang")
    dead = Subscriber.new(f"http://127.0.0.1:{free_port()}/push/dead")
    fine = Subscriber.new(f"{server.url}/push/fine")
    original = server.responder

    def respond(request: Request) -> Reply | None:
        if request.path == "/push/hang":
            server.hold()
            return None
        return original(request)

    server.responder = respond
    with make_provider(pem(vapid_key), timeout=0.3) as provider:
        results = provider.send_batch([push(1, hanging), push(2, dead), push(3, fine)])
    assert [(r.ok, r.transient, r.invalid_address) for r in results] == [
        (False, True, False),
        (False, True, False),
        (True, False, False),
    ]
    assert "timeout" in (results[0].error or "").lower()
    assert "connection" in (results[1].error or "").lower()


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({}, "not a key"),
        ({"vapid_subject": "push@whistle.example"}, None),
    ],
    ids=["bad-key", "bad-subject"],
)
def test_unusable_vapid_configuration_makes_the_provider_unavailable(
    server: PushServer, vapid_key: ec.EllipticCurvePrivateKey, settings: dict, key: str | None
) -> None:
    subscriber = Subscriber.new(f"{server.url}/push/a")
    with (
        make_provider(key or pem(vapid_key), **settings) as provider,
        pytest.raises(ProviderUnavailable),
    ):
        provider.send_batch([push(1, subscriber)])
    assert server.requests == []


def test_close_releases_the_session(
    server: PushServer, vapid_key: ec.EllipticCurvePrivateKey
) -> None:
    provider = make_provider(pem(vapid_key))
    assert provider.send_batch([push(1, Subscriber.new(f"{server.url}/push/a"))])[0].ok
    assert provider._session is not None
    provider.close()
    assert provider._session is None
    provider.close()


# -- validate -----------------------------------------------------------------------------


def _fields(settings: dict[str, Any], credentials: dict[str, Any]) -> dict[str, str]:
    return {e.field: e.message for e in WebPushProvider.validate(settings, credentials)}


@pytest.mark.parametrize(
    "subject", ["mailto:push@whistle.example", "https://whistle.example", "mailto:a@localhost"]
)
def test_validate_accepts_good_configurations(
    vapid_key: ec.EllipticCurvePrivateKey, subject: str
) -> None:
    for key in (pem(vapid_key), raw_private(vapid_key)):
        assert _fields({"vapid_subject": subject, "ttl": 0}, {"vapid_private_key": key}) == {}


def test_validate_requires_subject_and_key() -> None:
    assert set(_fields({}, {})) == {"settings.vapid_subject", "credentials.vapid_private_key"}


@pytest.mark.parametrize(
    "subject",
    [
        "push@whistle.example",
        "mailto:nobody",
        "http://whistle.example",
        "https://x.example/contact",
    ],
)
def test_validate_rejects_bad_subjects(vapid_key: ec.EllipticCurvePrivateKey, subject: str) -> None:
    errors = _fields({"vapid_subject": subject}, {"vapid_private_key": pem(vapid_key)})
    assert list(errors) == ["settings.vapid_subject"]


@pytest.mark.parametrize(
    ("key", "mentions"),
    [
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", "does not load"),
        ("!!!!", "does not load"),
        (b64url(b"\x00" * 32), "does not load"),
        (pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "P-256"),
        (pem(ec.generate_private_key(ec.SECP384R1())), "P-256"),
    ],
    ids=["bad-pem", "garbage", "zero-scalar", "rsa", "p384"],
)
def test_validate_rejects_bad_keys(key: str, mentions: str) -> None:
    errors = _fields({"vapid_subject": SUBJECT}, {"vapid_private_key": key})
    assert list(errors) == ["credentials.vapid_private_key"]
    assert mentions in errors["credentials.vapid_private_key"]


@pytest.mark.parametrize("ttl", [-1, 10**9, "3600", 1.5, True])
def test_validate_rejects_bad_ttl(vapid_key: ec.EllipticCurvePrivateKey, ttl: Any) -> None:
    errors = _fields({"vapid_subject": SUBJECT, "ttl": ttl}, {"vapid_private_key": pem(vapid_key)})
    assert list(errors) == ["settings.ttl"]
