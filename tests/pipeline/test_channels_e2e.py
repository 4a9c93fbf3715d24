"""SMS, push and webhook end to end: trigger, planner, a real RQ worker, real providers.

Every provider is a ``Provider`` row whose settings point at a local HTTP server on
127.0.0.1 (a :class:`RecordingServer` playing Twilio, Google OAuth + FCM, or a customer's
webhook endpoint), so the whole send path runs as in production up to the socket.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, update

from tests.channels.http_server import RecordedRequest, Reply, recording_server_fixture
from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, assert_counters_match_ledger
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.deliveries.models import Delivery, DeliveryBatch, StatScope
from whistle_web.deliveries.status import DeliveryStatus, SuppressionCause
from whistle_web.extensions import db
from whistle_web.models import (
    Device,
    DeviceKind,
    Notification,
    Provider,
    Suppression,
    SuppressionReason,
)
from whistle_web.notifications.services import trigger
from whistle_web.tenancy import organization_scope
from whistle_web.tracking import twilio_signature
from workers.sending import enqueue_batches

server = recording_server_fixture()

S = DeliveryStatus


def add_provider(
    org: Any,
    channel: Channel,
    kind: ProviderKind,
    settings: dict[str, Any],
    credentials: dict[str, Any],
    *,
    rate: float | None = None,
) -> Provider:
    with organization_scope(org.id):
        provider = Provider(
            channel=channel,
            kind=kind,
            name=f"{kind.value} provider",
            settings=settings,
            rate_limit_per_second=rate,
        )
        provider.set_credentials(credentials)
        db.session.add(provider)
        db.session.flush()
    return provider


def deliveries(org: Any, *where: Any) -> list[Delivery]:
    with organization_scope(org.id):
        db.session.expire_all()
        return list(db.session.scalars(select(Delivery).where(*where).order_by(Delivery.id)))


def delivery_to(org: Any, address: str) -> Delivery:
    (delivery,) = deliveries(org, Delivery.address == address)
    return delivery


def delivery_of(org: Any, recipient: Any) -> Delivery:
    (delivery,) = deliveries(org, Delivery.recipient_id == recipient.id)
    return delivery


# --- SMS through Twilio, then Twilio's status callbacks ---------------------------------------

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-e2e-0123456789"
FROM_NUMBER = "+14155550100"
MESSAGES_PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"


def twilio(server: Any) -> Any:
    """Answer each message with a sid derived from its destination number."""

    def answer(request: RecordedRequest) -> Reply:
        to = request.form()["To"]
        sid = "SM" + hashlib.md5(to.encode()).hexdigest()  # noqa: S324  (an id, not security)
        return Reply(201, json={"sid": sid, "status": "queued", "to": to})

    return server.set_handler(answer)


def twilio_callback(client: Any, app: Any, provider: Provider, **params: str) -> Any:
    """POST a status callback signed like Twilio signs it (for the public URL)."""
    path = f"/hooks/twilio/{provider.id}"
    form = {"AccountSid": ACCOUNT_SID, "ApiVersion": "2010-04-01", "From": FROM_NUMBER, **params}
    signature = twilio_signature.compute_signature(
        AUTH_TOKEN, app.config["WHISTLE_BASE_URL"] + path, form
    )
    return client.post(path, data=form, headers={"X-Twilio-Signature": signature})


def test_sms_goes_through_twilio_and_its_callbacks_move_the_ledger(
    app, client, org, make_template, make_recipient, server, jobs, statuses
):
    template = make_template(org, "code", CONTENT)
    provider = add_provider(
        org,
        Channel.SMS,
        ProviderKind.TWILIO,
        {"base_url": server.url, "from_number": FROM_NUMBER},
        {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN},
    )
    twilio(server)
    make_recipient(org, "ann", phone="+15555550101")
    make_recipient(org, "bob", phone="+15555550102")
    with organization_scope(org.id):
        trigger("code", to=["ann", "bob"], channels=["sms"], data={"code": "4711"}, actor=SYSTEM)
    jobs()

    assert statuses() == {"sent": 2}
    assert server.errors == []
    assert len(server.requests) == 2
    basic = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    by_number = {}
    for request in server.requests:
        assert request.method == "POST"
        assert request.path == MESSAGES_PATH
        assert request.headers["authorization"] == basic
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        form = request.form()
        assert (form["Body"], form["From"]) == ("Code 4711", FROM_NUMBER)
        assert "MessagingServiceSid" not in form
        # Receipts come back to the provider's signed callback endpoint by default.
        assert form["StatusCallback"] == (
            f"{app.config['WHISTLE_BASE_URL'].rstrip('/')}/hooks/twilio/{provider.id}"
        )
        by_number[form["To"]] = request
    assert sorted(by_number) == ["+15555550101", "+15555550102"]
    # The same HTTP connection carried both messages of the batch.
    assert len({r.client_address for r in server.requests}) == 1

    ann = delivery_to(org, "+15555550101")
    bob = delivery_to(org, "+15555550102")
    for delivery in (ann, bob):
        expected_sid = "SM" + hashlib.md5(delivery.address.encode()).hexdigest()  # noqa: S324
        assert delivery.provider_message_id == expected_sid
        assert delivery.provider_id == provider.id
        assert delivery.rendered == {"text": "Code 4711"}
        assert delivery.sent_at is not None

    response = twilio_callback(
        client,
        app,
        provider,
        MessageSid=ann.provider_message_id,
        MessageStatus="delivered",
        To=ann.address,
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    ann = delivery_to(org, ann.address)
    assert ann.status == S.DELIVERED and ann.delivered_at is not None

    # A callback signed with another token changes nothing.
    path = f"/hooks/twilio/{provider.id}"
    forged = {"MessageSid": bob.provider_message_id, "MessageStatus": "undelivered"}
    signature = twilio_signature.compute_signature(
        "not-the-token", app.config["WHISTLE_BASE_URL"] + path, forged
    )
    response = client.post(path, data=forged, headers={"X-Twilio-Signature": signature})
    assert response.status_code == 403
    assert delivery_to(org, bob.address).status == S.SENT

    response = twilio_callback(
        client,
        app,
        provider,
        MessageSid=bob.provider_message_id,
        MessageStatus="undelivered",
        ErrorCode="30005",  # unknown destination handset: permanent
        To=bob.address,
    )
    assert response.status_code == 200
    bob = delivery_to(org, bob.address)
    assert bob.status == S.BOUNCED and bob.bounced_at is not None
    with organization_scope(org.id):
        suppressed = [
            (s.channel, s.address, s.reason, s.delivery_id)
            for s in db.session.scalars(select(Suppression))
        ]
    assert suppressed == [(Channel.SMS, bob.address, SuppressionReason.HARD_BOUNCE, bob.id)]
    assert statuses() == {"delivered": 1, "bounced": 1}

    counts = assert_counters_match_ledger(org.id, StatScope.TEMPLATE, template.id)
    assert counts["sent"] == 2 and counts["delivered"] == 1 and counts["bounced"] == 1

    # The bounced number is not texted again.
    server.clear()
    with organization_scope(org.id):
        trigger("code", to=["bob"], channels=["sms"], data={"code": "1"}, actor=SYSTEM)
    jobs()
    assert server.requests == []
    (again,) = deliveries(org, Delivery.address == bob.address, Delivery.id != bob.id)
    assert again.status == S.SUPPRESSED
    assert again.suppression_reason == SuppressionCause.SUPPRESSION_LIST


def test_a_number_twilio_calls_invalid_is_not_texted_again(
    org, make_template, make_recipient, server, jobs, statuses
):
    make_template(org, "code", CONTENT)
    add_provider(
        org,
        Channel.SMS,
        ProviderKind.TWILIO,
        {"base_url": server.url, "from_number": FROM_NUMBER},
        {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN},
    )
    server.default = Reply(400, json={"code": 21211, "message": "Invalid 'To' Phone Number"})
    make_recipient(org, "bad", phone="+15005550001")
    with organization_scope(org.id):
        trigger("code", to=["bad"], channels=["sms"], data={"code": "1"}, actor=SYSTEM)
    jobs()
    assert statuses() == {"failed": 1}
    assert len(server.requests) == 1

    with organization_scope(org.id):
        suppressed = [
            (s.channel, s.address, s.reason) for s in db.session.scalars(select(Suppression))
        ]
    assert suppressed == [(Channel.SMS, "+15005550001", SuppressionReason.HARD_BOUNCE)]

    with organization_scope(org.id):
        trigger("code", to=["bad"], channels=["sms"], data={"code": "2"}, actor=SYSTEM)
    jobs()
    assert len(server.requests) == 1
    assert statuses() == {"failed": 1, "suppressed": 1}
    assert statuses() == {"failed": 1, "suppressed": 1}


# --- push through FCM (Google OAuth + FCM HTTP v1 on one local server) ------------------------

PROJECT = "whistle-e2e"
SEND_PATH = f"/v1/projects/{PROJECT}/messages:send"
CLIENT_EMAIL = "whistle@whistle-e2e.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class FakeGoogle:
    """``/token`` checks the signed assertion and issues a token; FCM answers per device."""

    def __init__(self, server: Any, key: rsa.RSAPrivateKey) -> None:
        self.server = server
        self.public_key = key.public_key()
        self.issued: list[str] = []
        self.unregistered: set[str] = set()
        server.set_handler(self.answer)

    @property
    def token_uri(self) -> str:
        return f"{self.server.url}/token"

    def fcm_requests(self) -> list[RecordedRequest]:
        return [r for r in self.server.requests if r.path == SEND_PATH]

    def token_requests(self) -> list[RecordedRequest]:
        return [r for r in self.server.requests if r.path == "/token"]

    def answer(self, request: RecordedRequest) -> Reply:
        if request.path == "/token":
            form = parse_qs(request.body.decode())
            assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
            claims = jwt.decode(
                form["assertion"][0],
                self.public_key,
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=CLIENT_EMAIL,
            )
            assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
            token = f"ya29.e2e-{len(self.issued)}"
            self.issued.append(token)
            return Reply(200, json={"access_token": token, "expires_in": 3600})
        if request.path != SEND_PATH:
            return Reply(404, json={"error": {"code": 404, "status": "NOT_FOUND"}})
        if request.headers.get("authorization") not in [f"Bearer {t}" for t in self.issued]:
            return Reply(401, json={"error": {"code": 401, "status": "UNAUTHENTICATED"}})
        device = request.json()["message"]["token"]
        if device in self.unregistered:
            return Reply(
                404,
                json={
                    "error": {
                        "code": 404,
                        "message": "Requested entity was not found.",
                        "status": "NOT_FOUND",
                        "details": [
                            {
                                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                "errorCode": "UNREGISTERED",
                            }
                        ],
                    }
                },
            )
        return Reply(200, json={"name": f"projects/{PROJECT}/messages/{device}-msg"})


@pytest.fixture
def google(server, rsa_key) -> FakeGoogle:
    return FakeGoogle(server, rsa_key)


def fcm_provider(org: Any, google: FakeGoogle, key: rsa.RSAPrivateKey) -> Provider:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    account = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "key-1",
        "private_key": pem,
        "client_email": CLIENT_EMAIL,
        # Google's real endpoint: the token_uri setting must win over it.
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    return add_provider(
        org,
        Channel.PUSH,
        ProviderKind.FCM,
        {"project_id": PROJECT, "base_url": google.server.url, "token_uri": google.token_uri},
        {"service_account_json": json.dumps(account)},
    )


def add_device(org: Any, recipient: Any, token: str, kind: DeviceKind = DeviceKind.FCM) -> Device:
    with organization_scope(org.id):
        device = Device(recipient_id=recipient.id, kind=kind, token=token)
        db.session.add(device)
        db.session.flush()
    return device


def reload_device(org: Any, device: Device) -> Device:
    with organization_scope(org.id):
        db.session.expire_all()
        return db.session.get(Device, device.id)


def test_push_goes_to_every_device_and_dead_tokens_are_disabled(
    org, make_template, make_recipient, server, google, rsa_key, jobs, statuses
):
    template = make_template(org, "ping", CONTENT)
    provider = fcm_provider(org, google, rsa_key)
    two = make_recipient(org, "two-devices")
    phone = add_device(org, two, "tok-phone")
    old_tablet = add_device(org, two, "tok-old-tablet")
    one = make_recipient(org, "one-dead-device")
    dead = add_device(org, one, "tok-gone")
    google.unregistered |= {"tok-old-tablet", "tok-gone"}
    with organization_scope(org.id):
        trigger(
            "ping",
            to=["two-devices", "one-dead-device"],
            channels=["push"],
            data={"reason": "your order shipped"},
            actor=SYSTEM,
        )
    jobs()

    assert server.errors == []
    assert len(google.token_requests()) == 1  # one access token for the whole batch
    sent = google.fcm_requests()
    assert sorted(r.json()["message"]["token"] for r in sent) == [
        "tok-gone",
        "tok-old-tablet",
        "tok-phone",
    ]
    for request in sent:
        assert request.method == "POST"
        assert request.headers["authorization"] == "Bearer ya29.e2e-0"
        assert request.json()["message"]["notification"] == {
            "title": "Ping",
            "body": "your order shipped",
        }

    # Two devices, one delivery: sent, because one device accepted it.
    accepted = delivery_of(org, two)
    assert accepted.status == S.SENT
    assert accepted.provider_id == provider.id
    assert accepted.provider_message_id == f"projects/{PROJECT}/messages/tok-phone-msg"
    # The only device is gone: the delivery failed, with FCM's reason.
    failed = delivery_of(org, one)
    assert failed.status == S.FAILED
    assert "UNREGISTERED" in failed.error
    assert statuses() == {"sent": 1, "failed": 1}

    assert reload_device(org, phone).disabled_at is None
    assert reload_device(org, old_tablet).disabled_at is not None
    assert reload_device(org, dead).disabled_at is not None
    counts = assert_counters_match_ledger(org.id, StatScope.TEMPLATE, template.id)
    assert counts["sent"] == 1 and counts["failed"] == 1

    # Next time: only the live device is targeted; the recipient without one is suppressed.
    server.clear()
    with organization_scope(org.id):
        trigger(
            "ping",
            to=["two-devices", "one-dead-device"],
            channels=["push"],
            data={"reason": "again"},
            actor=SYSTEM,
        )
    jobs()
    assert [r.json()["message"]["token"] for r in google.fcm_requests()] == ["tok-phone"]
    latest = deliveries(org, Delivery.id > max(accepted.id, failed.id))
    by_recipient = {d.recipient_id: d for d in latest}
    assert by_recipient[two.id].status == S.SENT
    assert by_recipient[one.id].status == S.SUPPRESSED
    assert by_recipient[one.id].suppression_reason == SuppressionCause.NO_ADDRESS
    assert_counters_match_ledger(org.id, StatScope.TEMPLATE, template.id)


def test_a_device_no_push_provider_can_reach_is_no_address(
    org, make_template, make_recipient, server, google, rsa_key, jobs, statuses
):
    make_template(org, "ping", CONTENT)
    fcm_provider(org, google, rsa_key)
    apple = make_recipient(org, "apple-only")
    add_device(org, apple, "apns-token", DeviceKind.APNS)
    android = make_recipient(org, "android")
    add_device(org, android, "tok-android")
    with organization_scope(org.id):
        trigger("ping", to=["apple-only", "android"], channels=["push"], actor=SYSTEM)
    jobs()

    assert [r.json()["message"]["token"] for r in google.fcm_requests()] == ["tok-android"]
    assert delivery_of(org, android).status == S.SENT
    skipped = delivery_of(org, apple)
    assert skipped.status == S.SUPPRESSED
    assert skipped.suppression_reason == SuppressionCause.NO_ADDRESS
    assert statuses() == {"sent": 1, "suppressed": 1}


# --- webhooks ---------------------------------------------------------------------------------

SIGNING_SECRET = "whsec_e2e_0123456789abcdef"


@pytest.fixture
def private_webhooks(app, monkeypatch) -> None:
    """Let webhooks reach the local server on 127.0.0.1."""
    monkeypatch.setitem(app.config, "WHISTLE_WEBHOOK_ALLOW_PRIVATE", True)


def webhook_provider(org: Any, server: Any, *, rate: float | None = None) -> Provider:
    return add_provider(
        org,
        Channel.WEBHOOK,
        ProviderKind.WEBHOOK,
        {"url": f"{server.url}/whistle-events"},
        {"signing_secret": SIGNING_SECRET},
        rate=rate,
    )


def test_webhook_payload_is_signed_and_carries_the_notification(
    org, make_template, make_recipient, server, private_webhooks, jobs, statuses
):
    make_template(org, "order", CONTENT)
    provider = webhook_provider(org, server)
    server.default = Reply(200, headers={"X-Request-Id": "req-123"})
    recipient = make_recipient(org, "ann", email="ann@example.com", phone="+15555550101")
    with organization_scope(org.id):
        trigger("order", to=["ann"], channels=["webhook"], data={"order": 42}, actor=SYSTEM)
    jobs()

    assert statuses() == {"sent": 1}
    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/whistle-events")
    assert request.headers["content-type"] == "application/json"
    delivery = delivery_of(org, recipient)
    with organization_scope(org.id):
        notification = db.session.get(Notification, delivery.notification_id)
    payload = request.json()
    assert payload["type"] == "notification"
    assert payload["delivery_id"] == delivery.id
    assert payload["notification_id"] == notification.id
    assert payload["template"] == "order"
    assert payload["recipient"] == {
        "external_id": "ann",
        "email": "ann@example.com",
        "phone": "+15555550101",
    }
    assert payload["data"] == {"order": 42}
    assert request.headers["whistle-delivery"] == str(delivery.id)

    # Verified the way the receiver is told to: HMAC-SHA256 over "timestamp.raw_body".
    timestamp = request.headers["whistle-timestamp"]
    assert abs(time.time() - int(timestamp)) < 60
    expected = hmac.new(
        SIGNING_SECRET.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256
    ).hexdigest()
    scheme, _, signature = request.headers["whistle-signature"].partition("=")
    assert scheme == "v1" and hmac.compare_digest(signature, expected)

    assert delivery.provider_id == provider.id
    assert delivery.provider_message_id == "req-123"


def test_webhook_server_errors_retry_with_backoff_and_client_errors_fail(
    org, make_template, make_recipient, server, private_webhooks, jobs, statuses
):
    make_template(org, "order", CONTENT)
    webhook_provider(org, server)
    flaky = make_recipient(org, "flaky")
    rejected = make_recipient(org, "rejected")

    def answer(request: RecordedRequest) -> Reply:
        if request.json()["recipient"]["external_id"] == "flaky":
            return Reply(500, body="upstream exploded")
        return Reply(400, body="unknown event type")

    server.set_handler(answer)
    started = datetime.now(UTC)
    with organization_scope(org.id):
        trigger("order", to=["flaky", "rejected"], channels=["webhook"], actor=SYSTEM)
    jobs()

    assert len(server.requests) == 2
    assert statuses() == {"queued": 1, "failed": 1}
    retry = delivery_of(org, flaky)
    assert retry.status == S.QUEUED
    assert retry.attempts == 1
    assert retry.not_before is not None and retry.not_before > started
    assert retry.not_before > datetime.now(UTC)  # deferred, not due again right away
    assert "500" in retry.error and "upstream exploded" in retry.error
    failed = delivery_of(org, rejected)
    assert failed.status == S.FAILED and failed.attempts == 1
    assert "400" in failed.error and "unknown event type" in failed.error

    # The batch job run again (as the sweeper would) sends nothing before the backoff ends.
    enqueue_batches([retry.batch_id], campaign=False, organization_id=org.id)
    jobs()
    assert batch_attempts(org, retry.batch_id) == 2  # the job did run
    assert len(server.requests) == 2
    assert delivery_of(org, flaky).status == S.QUEUED

    # Once the backoff has passed, the retry goes out and succeeds. (The test runs in one
    # transaction, where PostgreSQL's now() stays at its start: go back before that.)
    with organization_scope(org.id):
        db.session.execute(
            update(Delivery)
            .where(Delivery.id == retry.id)
            .values(not_before=datetime.now(UTC) - timedelta(hours=1))
        )
        db.session.commit()
    server.set_handler(None)
    enqueue_batches([retry.batch_id], campaign=False, organization_id=org.id)
    jobs()
    assert len(server.requests) == 3
    assert server.requests[-1].headers["whistle-delivery"] == str(retry.id)
    retried = delivery_of(org, flaky)
    assert retried.status == S.SENT and retried.attempts == 2 and retried.error is None


def batch_attempts(org: Any, batch_id: int) -> int:
    with organization_scope(org.id):
        db.session.expire_all()
        return db.session.get(DeliveryBatch, batch_id).attempts


# --- rate limit through the pipeline ----------------------------------------------------------


def test_the_providers_rate_limit_paces_a_batch(
    org, make_template, make_recipient, server, private_webhooks, jobs, statuses
):
    make_template(org, "order", CONTENT)
    webhook_provider(org, server, rate=5)  # 5/s, burst max(1, 5/10) = 1
    arrived: list[float] = []
    lock = threading.Lock()

    def answer(request: RecordedRequest) -> Reply:
        with lock:
            arrived.append(time.monotonic())
        return Reply(200)

    server.set_handler(answer)
    for i in range(10):
        make_recipient(org, f"r{i}")
    with organization_scope(org.id):
        trigger("order", to=[f"r{i}" for i in range(10)], channels=["webhook"], actor=SYSTEM)
    started = time.monotonic()
    jobs()
    elapsed = time.monotonic() - started

    assert statuses() == {"sent": 10}
    assert len(arrived) == 10
    # One token up front, then nine more at 5/s: at least 1.8 s (a little slack for clocks).
    assert arrived[-1] - arrived[0] >= 1.6, arrived
    assert elapsed >= 1.6
    assert elapsed < 6, "the bucket held the batch far longer than 10 tokens at 5/s need"
    # Never more requests in a window than the bucket allows: one up front plus 5/s, and one
    # more for a request whose arrival the busy machine stamped late (its successor then
    # follows closely; a minimum gap between two arrivals flaked under load).
    for i, j in itertools.combinations(range(len(arrived)), 2):
        assert j - i <= 2 + 5 * (arrived[j] - arrived[i]), (i, j, arrived)
