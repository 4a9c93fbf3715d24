"""The Twilio provider against a local HTTP server playing Twilio's REST API."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.channels.http_server import RecordingServer, recording_server_fixture, unused_port
from whistle_web.channels.base import Message, ProviderUnavailable, SendResult, provider_class
from whistle_web.channels.kinds import Channel
from whistle_web.channels.twilio import TwilioProvider

server = recording_server_fixture()

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token"
SERVICE_SID = "MG" + "fedcba9876543210" * 2
FROM = "+15005550006"
MESSAGES_PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"


def twilio(base_url: str, **settings: Any) -> TwilioProvider:
    return TwilioProvider(
        {"from_number": FROM, "base_url": base_url, **settings},
        {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN},
    )


def sms(delivery_id: int, to: str = "+14155550100", text: str = "Your code is 123456", **meta):
    return Message(delivery_id, Channel.SMS, to, {"text": text}, meta=meta)


def created(sid: str) -> dict[str, Any]:
    return {"sid": sid, "status": "queued", "account_sid": ACCOUNT_SID}


def test_registered() -> None:
    assert provider_class("twilio") is TwilioProvider


def test_sends_the_exact_twilio_request(server: RecordingServer) -> None:
    server.respond_with(201, json=created("SM0001"))
    with twilio(server.url + "/") as provider:  # a trailing slash on base_url is fine
        results = provider.send_batch([sms(7)])

    assert results == [SendResult.sent(7, "SM0001")]
    (request,) = server.requests
    assert request.method == "POST"
    assert request.target == MESSAGES_PATH
    expected_auth = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {expected_auth}"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.form_lists() == {
        "To": ["+14155550100"],
        "Body": ["Your code is 123456"],
        "From": [FROM],
    }


def test_messaging_service_and_status_callback(server: RecordingServer) -> None:
    server.respond_with(201, json=created("SM1")).respond_with(201, json=created("SM2"))
    provider = twilio(
        server.url,
        messaging_service_sid=SERVICE_SID,
        status_callback_url="https://whistle.example/hooks/twilio",
    )
    with provider:
        results = provider.send_batch(
            [
                sms(1),
                sms(2, status_callback_url="https://whistle.example/hooks/twilio?d=2"),
            ]
        )

    assert [r.provider_message_id for r in results] == ["SM1", "SM2"]
    first, second = (request.form() for request in server.requests)
    assert first == {
        "To": "+14155550100",
        "Body": "Your code is 123456",
        "MessagingServiceSid": SERVICE_SID,
        "StatusCallback": "https://whistle.example/hooks/twilio",
    }
    # The worker's per-message callback wins over the setting.
    assert second["StatusCallback"] == "https://whistle.example/hooks/twilio?d=2"
    assert "From" not in second


def test_a_batch_reuses_one_connection(server: RecordingServer) -> None:
    server.respond_with(201, json=created("SM"), times=3)
    with twilio(server.url) as provider:
        results = provider.send_batch([sms(1), sms(2), sms(3)])
    assert all(result.ok for result in results)
    assert len({request.client_address for request in server.requests}) == 1


@pytest.mark.parametrize(
    ("status", "body", "transient", "invalid_address"),
    [
        (429, {"code": 20429, "message": "Too Many Requests"}, True, False),
        (500, {"code": 20500, "message": "Internal Server Error"}, True, False),
        (503, None, True, False),
        (
            400,
            {"code": 21211, "message": "The 'To' number +1415 is not a valid phone number."},
            False,
            True,
        ),
        (400, {"code": 21614, "message": "'To' number is not a valid mobile number"}, False, True),
        (
            400,
            {"code": 21610, "message": "Attempt to send to unsubscribed recipient"},
            False,
            False,
        ),
        (404, {"code": 20404, "message": "The requested resource was not found"}, False, False),
    ],
)
def test_error_mapping(
    server: RecordingServer,
    status: int,
    body: dict[str, Any] | None,
    transient: bool,
    invalid_address: bool,
) -> None:
    server.respond_with(status, json=body, body=None if body else "upstream failure")
    with twilio(server.url) as provider:
        (result,) = provider.send_batch([sms(5)])

    assert not result.ok
    assert result.delivery_id == 5
    assert result.transient is transient
    assert result.invalid_address is invalid_address
    assert f"HTTP {status}" in (result.error or "")
    if body:
        assert f"Twilio error {body['code']}: {body['message']}" in (result.error or "")


def test_a_timeout_is_transient(server: RecordingServer) -> None:
    server.respond_with(201, json=created("SM-late"), delay=3)
    with twilio(server.url, timeout=0.2) as provider:
        (result,) = provider.send_batch([sms(1)])
    assert not result.ok and result.transient
    assert "timed out" in (result.error or "")


def test_refused_credentials_make_the_provider_unavailable(server: RecordingServer) -> None:
    server.respond_with(401, json={"code": 20003, "message": "Authenticate"})
    with twilio(server.url) as provider, pytest.raises(ProviderUnavailable, match="20003"):
        provider.send_batch([sms(1), sms(2)])
    assert len(server.requests) == 1


def test_unavailable_mid_batch_keeps_what_was_sent(server: RecordingServer) -> None:
    server.respond_with(201, json=created("SM1"))
    server.respond_with(401, json={"code": 20003, "message": "Authenticate"})
    with twilio(server.url) as provider:
        results = provider.send_batch([sms(1), sms(2), sms(3)])

    assert results[0] == SendResult.sent(1, "SM1")
    assert [(r.delivery_id, r.ok, r.transient) for r in results[1:]] == [
        (2, False, True),
        (3, False, True),
    ]
    assert len(server.requests) == 2  # nothing more is tried once credentials are refused


def test_connection_refused_makes_the_provider_unavailable() -> None:
    with (
        twilio(f"http://127.0.0.1:{unused_port()}") as provider,
        pytest.raises(ProviderUnavailable, match="cannot connect"),
    ):
        provider.send_batch([sms(1)])


def test_nothing_to_send(server: RecordingServer) -> None:
    with twilio(server.url) as provider:
        no_text, no_number = provider.send_batch([sms(1, text=""), sms(2, to="")])
    assert not no_text.ok and not no_text.transient and not no_text.invalid_address
    assert not no_number.ok and no_number.invalid_address
    assert server.requests == []


def test_close_releases_the_client(server: RecordingServer) -> None:
    server.respond_with(201, json=created("SM1"))
    provider = twilio(server.url)
    provider.send_batch([sms(1)])
    client = provider.client
    provider.close()
    assert client.is_closed
    provider.close()  # idempotent


def test_validate() -> None:
    good = {"from_number": FROM}
    credentials = {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN}
    assert TwilioProvider.validate(good, credentials) == []
    assert TwilioProvider.validate({"messaging_service_sid": SERVICE_SID}, credentials) == []

    def fields(settings: dict[str, Any], creds: dict[str, Any]) -> set[str]:
        return {error.field for error in TwilioProvider.validate(settings, creds)}

    assert fields({}, {}) == {
        "credentials.account_sid",
        "credentials.auth_token",
        "settings.from_number",
    }
    assert fields({"from_number": "4155550100"}, credentials) == {"settings.from_number"}
    assert fields({"from_number": "+1 415 555"}, credentials) == {"settings.from_number"}
    assert fields(good, {"account_sid": "nope", "auth_token": "x"}) == {"credentials.account_sid"}
    assert fields({**good, "messaging_service_sid": "MG1"}, credentials) == {
        "settings.messaging_service_sid"
    }
    assert fields({**good, "timeout": 0}, credentials) == {"settings.timeout"}
    assert fields({**good, "timeout": "soon"}, credentials) == {"settings.timeout"}
    assert fields({**good, "base_url": "ftp://x"}, credentials) == {"settings.base_url"}
