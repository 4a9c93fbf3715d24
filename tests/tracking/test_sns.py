"""SES events over Amazon SNS: signatures checked with real RSA keys and a local cert server."""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from tests.tracking import (
    assert_counters_match_ledger,
    events_of,
    make_delivery,
    make_provider,
    reload,
)
from whistle_web.channels.kinds import ProviderKind
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.extensions import db
from whistle_web.models import Suppression, SuppressionReason
from whistle_web.tenancy import organization_scope
from whistle_web.tracking import sns

S = DeliveryStatus
TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses-events"


def _certificate(key: rsa.RSAPrivateKey, *, days: int = 1) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.test.amazonaws.com")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


class CertServer:
    """A local stand-in for sns.<region>.amazonaws.com: serves PEMs, records every GET."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                body = outer.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey]:
    return {
        "aws": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "attacker": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.fixture(scope="module")
def cert_server(keys) -> Iterator[CertServer]:
    expired_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = CertServer(
        {
            "/SimpleNotificationService-test.pem": _certificate(keys["aws"]),
            "/expired.pem": _certificate(expired_key, days=-1),
            "/confirm": b"<ConfirmSubscriptionResponse/>",
        }
    )
    yield server
    server.close()


@pytest.fixture
def local_sns(app, monkeypatch, cert_server, redis) -> CertServer:
    """Allow the local server as the SNS host for this test only."""
    pattern = f"^{re.escape(cert_server.url)}/"
    monkeypatch.setitem(app.config, "WHISTLE_SNS_CERT_URL_PATTERN", pattern)
    monkeypatch.setitem(app.config, "WHISTLE_SNS_SUBSCRIBE_URL_PATTERN", pattern)
    sns.CERTIFICATES.clear()
    cert_server.requests.clear()
    yield cert_server
    sns.CERTIFICATES.clear()


def signed(
    key: rsa.RSAPrivateKey, message: dict[str, Any], *, version: str = "1"
) -> dict[str, Any]:
    # SignatureVersion 1 is SHA1withRSA: SNS's format, not a choice made here.
    algorithm = {"1": hashes.SHA1(), "2": hashes.SHA256()}[version]  # noqa: S303
    signature = key.sign(sns.canonical_string(message), padding.PKCS1v15(), algorithm)
    return {
        **message,
        "SignatureVersion": version,
        "Signature": base64.b64encode(signature).decode(),
    }


def notification(
    server: CertServer, ses_event: dict[str, Any], *, cert_path: str | None = None
) -> dict[str, Any]:
    return {
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": TOPIC,
        "Message": json.dumps(ses_event),
        "Timestamp": "2026-01-10T10:00:00.000Z",
        "SigningCertURL": server.url + (cert_path or "/SimpleNotificationService-test.pem"),
        "UnsubscribeURL": server.url + "/unsubscribe",
    }


def ses(event_type: str, message_id: str, **detail: Any) -> dict[str, Any]:
    event = {
        "eventType": event_type,
        "mail": {"messageId": message_id, "destination": ["ada@example.com"]},
    }
    event.update(detail)
    return event


def post(client, provider, message: dict[str, Any]):
    return client.post(
        f"/hooks/ses/{provider.id}",
        data=json.dumps(message),
        content_type="text/plain; charset=UTF-8",
        headers={"x-amz-sns-message-type": message["Type"]},
    )


@pytest.fixture
def provider(org):
    return make_provider(org, ProviderKind.SES, {"access_key_id": "AK", "secret_access_key": "s"})


@pytest.fixture
def recipient(org, make_recipient):
    return make_recipient(org, "ada", email="ada@example.com")


@pytest.fixture
def delivery(org, recipient, provider, make_send_request):
    return make_delivery(
        org,
        recipient,
        make_send_request(org),
        provider=provider,
        provider_message_id="ses-message-1",
    )


def suppressions(org) -> list[tuple[str, SuppressionReason, int | None]]:
    with organization_scope(org.id):
        return [
            (s.address, s.reason, s.delivery_id)
            for s in db.session.scalars(select(Suppression).order_by(Suppression.id))
        ]


def test_the_canonical_string_follows_the_aws_field_order():
    message = {
        "Type": "Notification",
        "MessageId": "m",
        "TopicArn": "t",
        "Subject": "s",
        "Message": "hello\nworld",
        "Timestamp": "ts",
        "Ignored": "x",
    }
    assert sns.canonical_string(message) == (
        b"Message\nhello\nworld\nMessageId\nm\nSubject\ns\nTimestamp\nts\n"
        b"TopicArn\nt\nType\nNotification\n"
    )
    del message["Subject"]
    assert b"Subject" not in sns.canonical_string(message)
    confirmation = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "m",
        "Token": "tok",
        "TopicArn": "t",
        "Message": "confirm",
        "SubscribeURL": "https://sns/x",
        "Timestamp": "ts",
    }
    assert sns.canonical_string(confirmation) == (
        b"Message\nconfirm\nMessageId\nm\nSubscribeURL\nhttps://sns/x\nTimestamp\nts\n"
        b"Token\ntok\nTopicArn\nt\nType\nSubscriptionConfirmation\n"
    )


def test_the_default_pattern_only_allows_aws_sns_hosts():
    allowed = sns.DEFAULT_URL_PATTERN
    assert sns.is_allowed_url("https://sns.us-east-1.amazonaws.com/Cert-1.pem", allowed)
    assert sns.is_allowed_url("https://sns.cn-north-1.amazonaws.com.cn/Cert.pem", allowed)
    for url in (
        "http://sns.us-east-1.amazonaws.com/Cert.pem",
        "https://sns.us-east-1.amazonaws.com.evil.example/Cert.pem",
        "https://evil.example/sns.us-east-1.amazonaws.com/",
        "https://sns.us-east-1.amazonaws.com@evil.example/",
        "https://sns.us-east-1.amazonaws.com\\@evil.example/",
        "https://s3.amazonaws.com/Cert.pem",
        None,
    ):
        assert not sns.is_allowed_url(url, allowed), url


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_permanent_bounce_bounces_and_suppresses(
    client, org, provider, delivery, local_sns, keys, version
):
    event = ses(
        "Bounce",
        "ses-message-1",
        bounce={
            "bounceType": "Permanent",
            "bounceSubType": "General",
            "bouncedRecipients": [{"emailAddress": "Ada@Example.com"}],
            "timestamp": "2026-01-10T09:59:00.000Z",
        },
    )
    response = post(
        client, provider, signed(keys["aws"], notification(local_sns, event), version=version)
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"status": "ok", "applied": 1}

    bounced = reload(org, delivery)
    assert bounced.status == S.BOUNCED
    assert bounced.bounced_at == datetime(2026, 1, 10, 9, 59, tzinfo=UTC)
    assert [(e.type, e.data) for e in events_of(org, delivery)] == [
        ("bounced", {"bounce_type": "permanent", "bounce_sub_type": "General"})
    ]
    assert suppressions(org) == [("ada@example.com", SuppressionReason.HARD_BOUNCE, delivery.id)]
    assert local_sns.requests == ["/SimpleNotificationService-test.pem"]
    assert_counters_match_ledger(org, delivery.template_id)


def test_a_transient_bounce_is_recorded_without_moving_the_ledger(
    client, org, provider, delivery, local_sns, keys
):
    event = ses(
        "Bounce",
        "ses-message-1",
        bounce={"bounceType": "Transient", "bounceSubType": "MailboxFull"},
    )
    response = post(client, provider, signed(keys["aws"], notification(local_sns, event)))
    assert response.status_code == 200
    assert reload(org, delivery).status == S.SENT
    assert [(e.type, e.data) for e in events_of(org, delivery)] == [
        ("soft_bounce", {"bounce_type": "transient", "bounce_sub_type": "MailboxFull"})
    ]
    assert suppressions(org) == []


def test_a_complaint_suppresses_the_address(client, org, provider, delivery, local_sns, keys):
    event = ses(
        "Complaint",
        "ses-message-1",
        complaint={
            "complainedRecipients": [{"emailAddress": "ada@example.com"}],
            "complaintFeedbackType": "abuse",
        },
    )
    assert (
        post(client, provider, signed(keys["aws"], notification(local_sns, event))).status_code
        == 200
    )
    assert [(e.type, e.data) for e in events_of(org, delivery)] == [
        ("complaint", {"feedback_type": "abuse"})
    ]
    assert suppressions(org) == [("ada@example.com", SuppressionReason.COMPLAINT, delivery.id)]


def test_delivery_open_and_click_events_move_forward_only(
    client, org, provider, delivery, local_sns, keys
):
    def send(event):
        message = signed(keys["aws"], notification(local_sns, event), version="2")
        assert post(client, provider, message).status_code == 200

    send(ses("Delivery", "ses-message-1", delivery={"recipients": ["ada@example.com"]}))
    assert reload(org, delivery).status == S.DELIVERED
    send(ses("Click", "ses-message-1", click={"link": "https://shop.example/"}))
    assert reload(org, delivery).status == S.CLICKED
    send(ses("Open", "ses-message-1", open={}))
    send(ses("Delivery", "ses-message-1", delivery={}))  # late: changes nothing
    assert reload(org, delivery).status == S.CLICKED
    assert [(e.type, e.data) for e in events_of(org, delivery)] == [
        ("delivered", {}),
        ("clicked", {"url": "https://shop.example/"}),
        ("opened", {}),
        ("delivered", {}),
    ]
    # One certificate fetch for all four messages.
    assert local_sns.requests == ["/SimpleNotificationService-test.pem"]
    counters = assert_counters_match_ledger(org, delivery.template_id)
    assert counters["email"]["delivered"] == 1 and counters["email"]["clicked"] == 1


def test_the_classic_notification_format_works_too(
    client, org, provider, delivery, local_sns, keys
):
    event = {
        "notificationType": "Bounce",
        "mail": {"messageId": "ses-message-1"},
        "bounce": {"bounceType": "Permanent", "bouncedRecipients": []},
    }
    assert (
        post(client, provider, signed(keys["aws"], notification(local_sns, event))).status_code
        == 200
    )
    assert reload(org, delivery).status == S.BOUNCED


def test_unknown_message_ids_and_untracked_events_are_ignored(
    client, org, provider, delivery, local_sns, keys
):
    for event in (
        ses("Bounce", "someone-elses-id", bounce={"bounceType": "Permanent"}),
        ses("Send", "ses-message-1", send={}),
        {"not": "ses"},
    ):
        response = post(client, provider, signed(keys["aws"], notification(local_sns, event)))
        assert response.status_code == 200
    assert events_of(org, delivery) == []


def test_a_redelivered_sns_message_is_applied_once(
    client, org, provider, delivery, local_sns, keys
):
    event = ses("Bounce", "ses-message-1", bounce={"bounceType": "Transient"})
    message = signed(keys["aws"], notification(local_sns, event))
    assert post(client, provider, message).get_json()["status"] == "ok"
    assert post(client, provider, message).get_json()["status"] == "duplicate"
    assert [e.type for e in events_of(org, delivery)] == ["soft_bounce"]


def assert_rejected(response, org, delivery, status=403):
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    assert reload(org, delivery).status == S.SENT
    assert events_of(org, delivery) == []
    assert suppressions(org) == []


def bounce_message(server: CertServer, **kwargs: Any) -> dict[str, Any]:
    return notification(
        server,
        ses("Bounce", "ses-message-1", bounce={"bounceType": "Permanent"}),
        **kwargs,
    )


def test_a_message_signed_by_another_key_is_refused(
    client, org, provider, delivery, local_sns, keys
):
    message = signed(keys["attacker"], bounce_message(local_sns))
    assert_rejected(post(client, provider, message), org, delivery)


def test_a_message_changed_after_signing_is_refused(
    client, org, provider, delivery, local_sns, keys
):
    message = signed(keys["aws"], notification(local_sns, ses("Delivery", "ses-message-1")))
    message["Message"] = json.dumps(
        ses("Bounce", "ses-message-1", bounce={"bounceType": "Permanent"})
    )
    assert_rejected(post(client, provider, message), org, delivery)


def test_missing_or_odd_signatures_are_refused(client, org, provider, delivery, local_sns, keys):
    good = signed(keys["aws"], bounce_message(local_sns))
    for change in (
        {"Signature": None},
        {"Signature": "not base64!"},
        {"SignatureVersion": "3"},
        {"SignatureVersion": None},
        {"Type": "Something"},
        {"MessageId": None},
    ):
        message = {k: v for k, v in {**good, **change}.items() if v is not None}
        assert_rejected(post(client, provider, message), org, delivery)
    response = client.post(f"/hooks/ses/{provider.id}", data="not json")
    assert response.status_code == 400


def test_certificates_are_only_fetched_from_allowed_urls(
    client, app, org, provider, delivery, local_sns, keys, monkeypatch
):
    monkeypatch.setitem(app.config, "WHISTLE_SNS_CERT_URL_PATTERN", sns.DEFAULT_URL_PATTERN)
    message = signed(keys["aws"], bounce_message(local_sns))
    assert_rejected(post(client, provider, message), org, delivery)
    assert local_sns.requests == []  # not even fetched


def test_an_expired_certificate_is_refused(client, org, provider, delivery, local_sns, keys):
    message = signed(keys["aws"], bounce_message(local_sns, cert_path="/expired.pem"))
    assert_rejected(post(client, provider, message), org, delivery)


def test_an_unreachable_certificate_asks_sns_to_retry(
    client, org, provider, delivery, local_sns, keys
):
    message = signed(keys["aws"], bounce_message(local_sns, cert_path="/missing.pem"))
    assert_rejected(post(client, provider, message), org, delivery, status=503)


def confirmation(server: CertServer, subscribe_url: str) -> dict[str, Any]:
    return {
        "Type": "SubscriptionConfirmation",
        "MessageId": str(uuid.uuid4()),
        "Token": "2336412f37fb687f5d51e6e2425",
        "TopicArn": TOPIC,
        "Message": "You have chosen to subscribe to the topic. To confirm, visit the SubscribeURL.",
        "SubscribeURL": subscribe_url,
        "Timestamp": "2026-01-10T10:00:00.000Z",
        "SigningCertURL": server.url + "/SimpleNotificationService-test.pem",
    }


def test_a_subscription_confirmation_visits_the_subscribe_url(client, provider, local_sns, keys):
    url = local_sns.url + "/confirm?Action=ConfirmSubscription&Token=2336412f37fb687f5d51e6e2425"
    response = post(client, provider, signed(keys["aws"], confirmation(local_sns, url)))
    assert response.status_code == 200
    assert response.get_json() == {"status": "confirmed"}
    assert local_sns.requests == [
        "/SimpleNotificationService-test.pem",
        "/confirm?Action=ConfirmSubscription&Token=2336412f37fb687f5d51e6e2425",
    ]


def test_a_subscribe_url_outside_the_pattern_is_not_visited(
    client, app, provider, local_sns, keys, monkeypatch
):
    monkeypatch.setitem(app.config, "WHISTLE_SNS_SUBSCRIBE_URL_PATTERN", sns.DEFAULT_URL_PATTERN)
    message = signed(keys["aws"], confirmation(local_sns, local_sns.url + "/confirm?Token=x"))
    assert post(client, provider, message).status_code == 403
    assert local_sns.requests == ["/SimpleNotificationService-test.pem"]
    forged = signed(keys["attacker"], confirmation(local_sns, local_sns.url + "/confirm"))
    assert post(client, provider, forged).status_code == 403
    assert "/confirm" not in local_sns.requests


def test_a_configured_topic_list_refuses_other_topics(client, org, delivery, local_sns, keys):
    provider = make_provider(
        org, ProviderKind.SES, settings={"sns_topic_arns": ["arn:aws:sns:eu-west-1:1:mine"]}
    )
    message = signed(keys["aws"], bounce_message(local_sns))
    assert_rejected(post(client, provider, message), org, delivery)


def test_a_provider_of_another_organization_cannot_touch_these_deliveries(
    client, org, other_org, delivery, local_sns, keys
):
    foreign = make_provider(other_org, ProviderKind.SES)
    response = post(client, foreign, signed(keys["aws"], bounce_message(local_sns)))
    assert response.status_code == 200
    assert response.get_json()["applied"] == 0
    assert reload(org, delivery).status == S.SENT
    assert suppressions(org) == [] and suppressions(other_org) == []


def test_unknown_providers_and_other_kinds_are_404(client, org, local_sns, keys):
    twilio = make_provider(org, ProviderKind.TWILIO, {"auth_token": "x"})
    message = signed(keys["aws"], bounce_message(local_sns))
    for provider_id in (twilio.id, 987654321):
        response = client.post(f"/hooks/ses/{provider_id}", data=json.dumps(message))
        assert response.status_code == 404
        assert response.mimetype == "application/problem+json"
