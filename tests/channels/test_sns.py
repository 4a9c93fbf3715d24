"""The SNS provider against a real moto server, and a recording server for exact requests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.channels.http_server import RecordingServer, recording_server_fixture, unused_port
from tests.moto_server import moto_server
from whistle_web.channels import sns as sns_module
from whistle_web.channels.base import Message, ProviderUnavailable, SendResult, provider_class
from whistle_web.channels.kinds import Channel
from whistle_web.channels.sns import SnsProvider

server = recording_server_fixture()

CREDENTIALS = {"access_key_id": "AKIDWHISTLETEST", "secret_access_key": "whistle-secret-key"}
XMLNS = "http://sns.amazonaws.com/doc/2010-03-31/"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Dummy AWS settings so nothing from the machine's environment or ~/.aws leaks in."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SNS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server("us-east-1") as url:
        yield url


@pytest.fixture
def moto(moto_url: str) -> str:
    httpx.post(f"{moto_url}/moto-api/reset").raise_for_status()
    return moto_url


def published_sms(moto_url: str) -> list[dict[str, str]]:
    return httpx.get(f"{moto_url}/moto-api/data.json").json()["sns"]["SMS"]


def sns(endpoint_url: str, **settings: Any) -> SnsProvider:
    return SnsProvider(
        {"region": "eu-west-1", "endpoint_url": endpoint_url, **settings}, CREDENTIALS
    )


def sms(delivery_id: int, to: str = "+14155550100", text: str = "Your code is 123456") -> Message:
    return Message(delivery_id, Channel.SMS, to, {"text": text})


def publish_response(message_id: str) -> str:
    return (
        f'<PublishResponse xmlns="{XMLNS}"><PublishResult><MessageId>{message_id}</MessageId>'
        "</PublishResult><ResponseMetadata><RequestId>req-1</RequestId></ResponseMetadata>"
        "</PublishResponse>"
    )


def error_response(code: str, message: str, kind: str = "Sender") -> str:
    return (
        f'<ErrorResponse xmlns="{XMLNS}"><Error><Type>{kind}</Type><Code>{code}</Code>'
        f"<Message>{message}</Message></Error><RequestId>req-2</RequestId></ErrorResponse>"
    )


def respond_xml(server: RecordingServer, status: int, body: str) -> None:
    server.respond_with(status, body=body, headers={"Content-Type": "text/xml"})


def test_registered() -> None:
    assert provider_class("sns") is SnsProvider


def test_publishes_sms_through_moto(moto: str) -> None:
    with sns(moto) as provider:
        results = provider.send_batch([sms(1), sms(2, to="+447700900123", text="Hello")])

    assert [result.ok for result in results] == [True, True]
    published = published_sms(moto)
    assert [(s["message_id"], s["phone_number"], s["message"]) for s in published] == [
        (results[0].provider_message_id, "+14155550100", "Your code is 123456"),
        (results[1].provider_message_id, "+447700900123", "Hello"),
    ]


def test_an_invalid_number_is_permanent_and_disables_the_address(moto: str) -> None:
    with sns(moto) as provider:
        (result,) = provider.send_batch([sms(3, to="+0123")])
    assert not result.ok and not result.transient
    assert result.invalid_address
    assert "InvalidParameter" in (result.error or "")
    assert published_sms(moto) == []


def test_sends_the_exact_publish_request(server: RecordingServer) -> None:
    respond_xml(server, 200, publish_response("msg-1"))
    with sns(server.url, sender_id="Whistle", sms_type="Promotional") as provider:
        results = provider.send_batch([sms(9)])

    assert results == [SendResult.sent(9, "msg-1")]
    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/")
    assert request.form_lists() == {
        "Action": ["Publish"],
        "Version": ["2010-03-31"],
        "PhoneNumber": ["+14155550100"],
        "Message": ["Your code is 123456"],
        "MessageAttributes.entry.1.Name": ["AWS.SNS.SMS.SMSType"],
        "MessageAttributes.entry.1.Value.DataType": ["String"],
        "MessageAttributes.entry.1.Value.StringValue": ["Promotional"],
        "MessageAttributes.entry.2.Name": ["AWS.SNS.SMS.SenderID"],
        "MessageAttributes.entry.2.Value.DataType": ["String"],
        "MessageAttributes.entry.2.Value.StringValue": ["Whistle"],
    }
    # Signed with the provider's credentials and region, not the environment's.
    authorization = request.headers["Authorization"]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDWHISTLETEST/")
    assert "/eu-west-1/sns/aws4_request" in authorization


def test_sms_type_defaults_to_transactional(server: RecordingServer) -> None:
    respond_xml(server, 200, publish_response("msg-1"))
    with sns(server.url) as provider:
        provider.send_batch([sms(1)])
    form = server.requests[0].form()
    assert form["MessageAttributes.entry.1.Value.StringValue"] == "Transactional"
    assert "MessageAttributes.entry.2.Name" not in form


@pytest.mark.parametrize(
    ("status", "code", "message", "transient", "invalid_address"),
    [
        (400, "Throttling", "Rate exceeded", True, False),
        (400, "Throttled", "Account throttled", True, False),
        (500, "InternalError", "Internal failure", True, False),
        (503, "ServiceUnavailable", "Try again", True, False),
        (
            400,
            "InvalidParameter",
            "Invalid parameter: PhoneNumber Reason: +1555 is not valid to publish to",
            False,
            True,
        ),
        (400, "InvalidParameter", "Invalid parameter: Message too long", False, False),
        (400, "KMSDisabled", "Key disabled", False, False),
    ],
)
def test_error_mapping(
    server: RecordingServer,
    status: int,
    code: str,
    message: str,
    transient: bool,
    invalid_address: bool,
) -> None:
    respond_xml(server, status, error_response(code, message))
    with sns(server.url) as provider:
        (result,) = provider.send_batch([sms(4)])

    assert not result.ok
    assert result.delivery_id == 4
    assert (result.transient, result.invalid_address) == (transient, invalid_address)
    assert result.error == f"SNS error {code}: {message}"
    assert len(server.requests) == 1  # botocore does not retry behind the worker's back


def test_refused_credentials_make_the_provider_unavailable(server: RecordingServer) -> None:
    respond_xml(server, 403, error_response("InvalidClientTokenId", "The token is invalid"))
    with sns(server.url) as provider, pytest.raises(ProviderUnavailable, match="InvalidClient"):
        provider.send_batch([sms(1), sms(2)])
    assert len(server.requests) == 1


def test_unavailable_mid_batch_keeps_what_was_sent(server: RecordingServer) -> None:
    respond_xml(server, 200, publish_response("msg-1"))
    respond_xml(server, 403, error_response("InvalidClientTokenId", "The token is invalid"))
    with sns(server.url) as provider:
        results = provider.send_batch([sms(1), sms(2), sms(3)])
    assert results[0] == SendResult.sent(1, "msg-1")
    assert [(r.delivery_id, r.ok, r.transient) for r in results[1:]] == [
        (2, False, True),
        (3, False, True),
    ]


def test_connection_refused_makes_the_provider_unavailable() -> None:
    with (
        sns(f"http://127.0.0.1:{unused_port()}") as provider,
        pytest.raises(ProviderUnavailable, match="cannot connect"),
    ):
        provider.send_batch([sms(1)])


def test_a_read_timeout_is_transient(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sns_module, "READ_TIMEOUT", 0.3)
    server.respond_with(200, body=publish_response("late"), delay=3)
    with sns(server.url) as provider:
        (result,) = provider.send_batch([sms(1)])
    assert not result.ok and result.transient
    assert "timeout" in (result.error or "").lower()


def test_nothing_to_send(server: RecordingServer) -> None:
    with sns(server.url) as provider:
        no_text, no_number = provider.send_batch([sms(1, text=""), sms(2, to="")])
    assert not no_text.ok and not no_text.invalid_address
    assert not no_number.ok and no_number.invalid_address
    assert server.requests == []


def test_validate() -> None:
    good = {"region": "eu-west-1"}
    assert SnsProvider.validate(good, CREDENTIALS) == []
    full = {
        **good,
        "sender_id": "Whistle",
        "sms_type": "Promotional",
        "endpoint_url": "https://sns.eu-west-1.amazonaws.com",
    }
    assert SnsProvider.validate(full, CREDENTIALS) == []

    def fields(settings: dict[str, Any], credentials: dict[str, Any] = CREDENTIALS) -> set[str]:
        return {error.field for error in SnsProvider.validate(settings, credentials)}

    assert fields({}, {}) == {
        "settings.region",
        "credentials.access_key_id",
        "credentials.secret_access_key",
    }
    assert fields({"region": "Europe"}) == {"settings.region"}
    assert fields({**good, "sms_type": "Urgent"}) == {"settings.sms_type"}
    assert fields({**good, "sender_id": "TwelveChars1"}) == {"settings.sender_id"}
    assert fields({**good, "sender_id": "12345"}) == {"settings.sender_id"}
    assert fields({**good, "endpoint_url": "sns.local"}) == {"settings.endpoint_url"}
