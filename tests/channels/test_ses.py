"""The SES provider against a real moto server on 127.0.0.1."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest

from tests.moto_server import moto_server
from whistle_web.channels.base import Message, ProviderUnavailable, provider_class
from whistle_web.channels.kinds import Channel
from whistle_web.channels.ses import SesProvider, _transient

REGION = "eu-west-1"
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server(REGION) as url:
        yield url


@pytest.fixture
def sender(moto_url: str) -> str:
    """A sender address SES has verified (fresh per test)."""
    address = f"alerts-{uuid.uuid4().hex[:8]}@whistle.example"
    client = boto3.client("sesv2", region_name=REGION, endpoint_url=moto_url)
    try:
        client.create_email_identity(EmailIdentity=address)
    finally:
        client.close()
    return address


def sent_messages(moto_url: str) -> list[dict[str, Any]]:
    """What moto's SES has accepted, from its model dump."""
    response = httpx.get(f"{moto_url}/moto-api/data.json", timeout=10)
    response.raise_for_status()
    return response.json()["ses"]["Message"]


def make_provider(moto_url: str, from_email: str, **settings: Any) -> SesProvider:
    base = {"region": REGION, "from_email": from_email, "endpoint_url": moto_url}
    return SesProvider({**base, **settings}, dict(CREDENTIALS))


def email(delivery_id: int, to: str, **content: str) -> Message:
    return Message(
        delivery_id=delivery_id,
        channel=Channel.EMAIL,
        to=to,
        content=content
        or {
            "subject": f"Order {delivery_id} shipped",
            "text": f"Order {delivery_id} is on its way.",
            "html": f"<p>Order <b>{delivery_id}</b> is on its way.</p>",
        },
        headers={
            "List-Unsubscribe": "<https://whistle.example/u/abc>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "Message-ID": "<ignored@whistle.example>",
        },
    )


def test_registered_for_its_kind():
    assert provider_class("ses") is SesProvider


def test_sends_a_batch_over_one_client(moto_url: str, sender: str):
    recipients = ["ada@example.com", "grace@example.com", "linus@example.com"]
    with make_provider(moto_url, sender, from_name="Whistle Alerts") as provider:
        results = provider.send_batch([email(i, to) for i, to in enumerate(recipients, 1)])
        client = provider.client
        more = provider.send_batch([email(4, "barbara@example.com", subject="Hi", text="x")])
        assert provider.client is client  # one client for the provider's lifetime

    assert [r.ok for r in results + more] == [True, True, True, True]
    assert [r.delivery_id for r in results] == [1, 2, 3]
    ids = {r.provider_message_id for r in results + more}
    assert len(ids) == 4 and None not in ids

    captured = {m["id"]: m for m in sent_messages(moto_url) if m["id"] in ids}
    assert len(captured) == 4
    by_id = [captured[r.provider_message_id] for r in results]
    assert [m["destinations"]["ToAddresses"] for m in by_id] == [[to] for to in recipients]
    assert [m["subject"] for m in by_id] == [
        "Order 1 shipped",
        "Order 2 shipped",
        "Order 3 shipped",
    ]
    assert {m["source"] for m in by_id} == {f"Whistle Alerts <{sender}>"}
    assert by_id[0]["body"] == "<p>Order <b>1</b> is on its way.</p>"  # moto keeps the HTML
    assert captured[more[0].provider_message_id]["body"] == "x"


def test_request_shape(sender: str, moto_url: str):
    provider = make_provider(moto_url, sender, from_name="Zoë", configuration_set="marketing")
    request = provider._request(email(1, "ada@example.com"))
    assert request["FromEmailAddress"] == f"=?utf-8?q?Zo=C3=AB?= <{sender}>"
    assert request["ConfigurationSetName"] == "marketing"
    simple = request["Content"]["Simple"]
    assert set(simple["Body"]) == {"Text", "Html"}
    assert simple["Headers"] == [
        {"Name": "List-Unsubscribe", "Value": "<https://whistle.example/u/abc>"},
        {"Name": "List-Unsubscribe-Post", "Value": "List-Unsubscribe=One-Click"},
    ]
    bare = provider._request(Message(2, Channel.EMAIL, "b@example.com", {"subject": "s"}))
    assert bare["Content"]["Simple"]["Body"] == {"Text": {"Data": "", "Charset": "UTF-8"}}
    assert "Headers" not in bare["Content"]["Simple"]


def test_header_injection_is_refused_before_calling_ses(moto_url: str, sender: str):
    evil = Message(
        1,
        Channel.EMAIL,
        "ada@example.com",
        {"subject": "Hi\nthere", "text": "x"},
        headers={"X-Campaign": "a\r\nBcc: victim@example.com"},
    )
    with make_provider(moto_url, sender) as provider:
        bad, good = provider.send_batch([evil, email(2, "grace@example.com")])
    assert not bad.ok and not bad.transient
    assert "line break" in bad.error
    assert good.ok
    assert (
        provider._request(Message(3, Channel.EMAIL, "a@b.example", {"subject": "A\nB"}))["Content"][
            "Simple"
        ]["Subject"]["Data"]
        == "A B"
    )


def test_unverified_sender_is_a_permanent_failure(moto_url: str, sender: str):
    with make_provider(moto_url, "nobody@unverified.example") as provider:
        (result,) = provider.send_batch([email(1, "ada@example.com")])
    assert not result.ok
    assert not result.transient
    assert "MessageRejected" in result.error


def test_unreachable_endpoint_raises_provider_unavailable(sender: str):
    provider = make_provider(f"http://127.0.0.1:{free_port()}", sender, timeout=2)
    with pytest.raises(ProviderUnavailable, match="cannot reach SES"), provider:
        provider.send_batch([email(1, "ada@example.com")])


def test_error_codes_map_to_transient_or_permanent():
    assert _transient("Throttling", 400)
    assert _transient("TooManyRequests", 429)
    assert _transient("ServiceUnavailable", 503)
    assert _transient("Whatever", 500)
    assert not _transient("MessageRejected", 400)
    assert not _transient("MailFromDomainNotVerified", 400)
    assert not _transient("BadRequest", 400)
    assert not _transient("SomethingNew", 400)


def test_validate_names_the_bad_fields():
    errors = SesProvider.validate({"from_email": "nope", "endpoint_url": "ftp://x"}, {})
    assert {e.field for e in errors} == {
        "settings.region",
        "settings.from_email",
        "settings.endpoint_url",
        "credentials.access_key_id",
        "credentials.secret_access_key",
    }
    good = {"region": REGION, "from_email": "ops@corp.example", "configuration_set": "tx"}
    assert SesProvider.validate(good, CREDENTIALS) == []
