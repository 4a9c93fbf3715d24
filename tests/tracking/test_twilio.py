"""Twilio status callbacks, authenticated by X-Twilio-Signature."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from werkzeug.datastructures import MultiDict

from tests.tracking import events_of, make_delivery, make_provider, reload
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.extensions import db
from whistle_web.models import Suppression, SuppressionReason
from whistle_web.tenancy import organization_scope
from whistle_web.tracking import twilio_signature

S = DeliveryStatus
AUTH_TOKEN = "twilio-auth-token-0123456789abcdef"
SID = "SM0123456789abcdef0123456789abcdef"

# Twilio's published example: auth token 12345 and this URL and these parameters.
DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}


def test_the_signature_matches_twilios_published_example():
    assert twilio_signature.compute_signature("12345", DOC_URL, DOC_PARAMS) == (
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    )
    assert twilio_signature.is_valid("12345", DOC_URL, DOC_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    # Twilio may sign the URL with the default port; both spellings are accepted.
    assert twilio_signature.is_valid("12345", DOC_URL, DOC_PARAMS, "kvajT1Ptam85bY51eRf/AJRuM3w=")
    with_port = DOC_URL.replace(".com", ".com:443")
    assert twilio_signature.is_valid("12345", with_port, DOC_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


def test_wrong_tokens_urls_params_or_signatures_do_not_validate():
    good = twilio_signature.compute_signature("12345", DOC_URL, DOC_PARAMS)
    assert not twilio_signature.is_valid("54321", DOC_URL, DOC_PARAMS, good)
    assert not twilio_signature.is_valid("12345", DOC_URL + "&x=1", DOC_PARAMS, good)
    assert not twilio_signature.is_valid("12345", DOC_URL, {**DOC_PARAMS, "To": "+1"}, good)
    assert not twilio_signature.is_valid("12345", DOC_URL, DOC_PARAMS, good[:-2])
    assert not twilio_signature.is_valid("12345", DOC_URL, DOC_PARAMS, "")
    assert not twilio_signature.is_valid("12345", DOC_URL, DOC_PARAMS, None)
    assert not twilio_signature.is_valid("", DOC_URL, DOC_PARAMS, good)


def test_repeated_parameters_are_all_signed():
    params = MultiDict([("b", "2"), ("a", "y"), ("a", "x")])
    assert twilio_signature.signed_data("https://h/p", params) == "https://h/pax" + "ay" + "b2"
    assert twilio_signature.signed_data("https://h/p", {"a": ["y", "x"]}) == "https://h/paxay"


@pytest.fixture
def provider(org):
    return make_provider(org, ProviderKind.TWILIO, {"account_sid": "AC1", "auth_token": AUTH_TOKEN})


@pytest.fixture
def delivery(org, make_recipient, make_send_request, provider):
    recipient = make_recipient(org, "bob", phone="+15555550100")
    return make_delivery(
        org,
        recipient,
        make_send_request(org),
        channel=Channel.SMS,
        provider=provider,
        provider_message_id=SID,
    )


def callback(client, app, provider, params, *, token=AUTH_TOKEN, signature=None, query=""):
    path = f"/hooks/twilio/{provider.id}" + (f"?{query}" if query else "")
    # Signed for the public URL, as Twilio sees it, whatever host the request arrives on.
    url = app.config["WHISTLE_BASE_URL"] + path
    if signature is None:
        signature = twilio_signature.compute_signature(token, url, params)
    headers = {} if signature is False else {"X-Twilio-Signature": signature}
    return client.post(path, data=params, headers=headers)


def status(message_status: str, **extra: str) -> dict[str, str]:
    return {
        "AccountSid": "AC1",
        "MessageSid": SID,
        "SmsSid": SID,
        "MessageStatus": message_status,
        "SmsStatus": message_status,
        "To": "+15555550100",
        "From": "+15555550199",
        "ApiVersion": "2010-04-01",
        **extra,
    }


def suppressions(org):
    with organization_scope(org.id):
        return [(s.channel, s.address, s.reason) for s in db.session.scalars(select(Suppression))]


def test_delivered_moves_the_ledger(client, app, org, provider, delivery):
    response = callback(client, app, provider, status("delivered"))
    assert response.status_code == 200
    assert reload(org, delivery).status == S.DELIVERED
    assert [e.type for e in events_of(org, delivery)] == ["delivered"]


def test_a_query_string_is_part_of_the_signed_url(client, app, org, provider, delivery):
    response = callback(client, app, provider, status("delivered"), query="tenant=acme&x=%20")
    assert response.status_code == 200
    assert reload(org, delivery).status == S.DELIVERED


def test_sent_and_queued_are_ignored(client, app, org, provider, delivery):
    for value in ("queued", "sending", "sent", "accepted"):
        assert callback(client, app, provider, status(value)).status_code == 200
    assert reload(org, delivery).status == S.SENT
    assert events_of(org, delivery) == []


@pytest.mark.parametrize("code", ["30003", "30005", "30006", "21211", "21614"])
def test_permanent_errors_bounce_and_suppress_the_number(
    client, app, org, provider, delivery, code
):
    response = callback(client, app, provider, status("undelivered", ErrorCode=code))
    assert response.status_code == 200
    assert reload(org, delivery).status == S.BOUNCED
    [event] = events_of(org, delivery)
    assert event.type == "bounced"
    assert event.data == {
        "bounce_type": "permanent",
        "error_code": code,
        "twilio_status": "undelivered",
    }
    assert suppressions(org) == [(Channel.SMS, "+15555550100", SuppressionReason.HARD_BOUNCE)]


@pytest.mark.parametrize(
    ("value", "code"), [("undelivered", "30007"), ("failed", ""), ("failed", "30008")]
)
def test_other_failures_are_soft_bounces(client, app, org, provider, delivery, value, code):
    params = status(value, ErrorCode=code) if code else status(value)
    assert callback(client, app, provider, params).status_code == 200
    assert reload(org, delivery).status == S.SENT
    [event] = events_of(org, delivery)
    assert event.type == "soft_bounce" and event.data["bounce_type"] == "transient"
    assert suppressions(org) == []


def test_a_late_delivered_after_a_bounce_changes_nothing(client, app, org, provider, delivery):
    callback(client, app, provider, status("failed", ErrorCode="21211"))
    callback(client, app, provider, status("delivered"))
    assert reload(org, delivery).status == S.BOUNCED


@pytest.mark.parametrize(
    "signature",
    [
        False,  # no header at all
        "",
        "bm90IHRoZSBzaWduYXR1cmU=",
    ],
)
def test_missing_or_wrong_signatures_are_refused(client, app, org, provider, delivery, signature):
    response = callback(
        client, app, provider, status("undelivered", ErrorCode="30003"), signature=signature
    )
    assert response.status_code == 403
    assert response.mimetype == "application/problem+json"
    assert reload(org, delivery).status == S.SENT
    assert events_of(org, delivery) == []
    assert suppressions(org) == []


def test_a_signature_made_with_another_token_or_for_other_params_is_refused(
    client, app, org, provider, delivery
):
    response = callback(client, app, provider, status("delivered"), token="someone-elses-token")
    assert response.status_code == 403
    url = app.config["WHISTLE_BASE_URL"] + f"/hooks/twilio/{provider.id}"
    signature = twilio_signature.compute_signature(AUTH_TOKEN, url, status("delivered"))
    tampered = status("undelivered", ErrorCode="30003")
    response = client.post(
        f"/hooks/twilio/{provider.id}", data=tampered, headers={"X-Twilio-Signature": signature}
    )
    assert response.status_code == 403
    assert reload(org, delivery).status == S.SENT


def test_a_signature_for_the_internal_host_is_refused(client, org, provider, delivery):
    # Signed for the URL the test client uses, not the public WHISTLE_BASE_URL.
    path = f"/hooks/twilio/{provider.id}"
    signature = twilio_signature.compute_signature(
        AUTH_TOKEN, "http://whistle.test" + path, status("delivered")
    )
    response = client.post(
        path, data=status("delivered"), headers={"X-Twilio-Signature": signature}
    )
    assert response.status_code == 403


def test_a_provider_of_another_organization_cannot_touch_these_deliveries(
    client, app, org, other_org, delivery
):
    foreign = make_provider(other_org, ProviderKind.TWILIO, {"auth_token": "other-token"})
    response = callback(
        client, app, foreign, status("undelivered", ErrorCode="30003"), token="other-token"
    )
    assert response.status_code == 200
    assert reload(org, delivery).status == S.SENT
    assert suppressions(org) == [] and suppressions(other_org) == []


def test_unknown_providers_and_providers_without_a_token_are_refused(client, app, org):
    ses = make_provider(org, ProviderKind.SES)
    assert callback(client, app, ses, status("delivered")).status_code == 404
    tokenless = make_provider(org, ProviderKind.TWILIO, {"account_sid": "AC1"})
    assert callback(client, app, tokenless, status("delivered"), token="").status_code == 403
    response = client.post("/hooks/twilio/987654321", data=status("delivered"))
    assert response.status_code == 404
