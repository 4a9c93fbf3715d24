"""Recipient preferences, devices and widget tokens through the API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt
import pytest
from sqlalchemy import select

from tests.api.conftest import ApiClient, assert_problem
from tests.api.test_audiences import audit
from whistle_web import crypto
from whistle_web.api.resources.preferences import ChannelSwitchesOut
from whistle_web.channels.kinds import Channel
from whistle_web.extensions import db
from whistle_web.organizations.models import Organization
from whistle_web.preferences.models import Category, Preference
from whistle_web.preferences.services import (
    InvalidRecipientToken,
    issue_recipient_token,
    verify_recipient_token,
)
from whistle_web.recipients.models import Device
from whistle_web.tenancy import organization_scope

ALL_ON = {c.value: True for c in Channel}
WEBPUSH = {
    "kind": "webpush",
    "token": "https://push.example.com/send/abc",
    "data": {"keys": {"p256dh": "BPub", "auth": "secret"}},
}


@pytest.fixture
def categories(org):
    with organization_scope(org.id):
        billing = Category(key="billing", name="Billing", critical=True)
        social = Category(key="social", name="Social", default_channels=["email"])
        db.session.add_all([billing, social])
        db.session.flush()
    return {"billing": billing, "social": social}


def test_channel_switches_cover_every_channel():
    assert set(ChannelSwitchesOut.model_fields) == {c.value for c in Channel}


def test_defaults_are_all_on(org, api, make_recipient, categories):
    make_recipient(org, "u1")
    response = api.get("/recipients/u1/preferences")
    assert response.status_code == 200
    assert response.json == {
        "unsubscribed": False,
        "quiet_hours": None,
        "channels": ALL_ON,
        "categories": [
            {"key": "billing", "name": "Billing", "critical": True, "channels": ALL_ON},
            {"key": "social", "name": "Social", "critical": False, "channels": ALL_ON},
        ],
    }


def test_put_changes_only_what_is_sent(org, api, make_recipient, categories):
    recipient = make_recipient(org, "u1")
    response = api.put(
        "/recipients/u1/preferences",
        json={
            "channels": {"sms": False},
            "categories": [{"key": "social", "channels": {"email": False, "sms": True}}],
            "quiet_hours": {"start": "22:00", "end": "07:30"},
        },
    )
    assert response.status_code == 200, response.json
    prefs = response.json
    assert prefs["channels"] == {**ALL_ON, "sms": False}
    social = prefs["categories"][1]
    # The category switch beats the all-categories one; critical categories stay on.
    assert social["channels"] == {**ALL_ON, "email": False, "sms": True}
    assert prefs["categories"][0]["channels"] == ALL_ON
    assert prefs["quiet_hours"] == {"start": "22:00:00", "end": "07:30:00"}
    entry = audit(org, "recipient.preferences_updated")[0]
    assert entry.target_id == str(recipient.id)
    assert entry.changes["quiet_hours"] == {"start": "22:00:00", "end": "07:30:00"}
    assert len(entry.changes["switches"]) == 3

    # Sending nothing changes nothing (and writes no audit entry).
    assert api.put("/recipients/u1/preferences", json={}).json == prefs
    assert len(audit(org, "recipient.preferences_updated")) == 1

    # null removes a switch; the quiet hours can be cleared.
    cleared = api.put(
        "/recipients/u1/preferences", json={"channels": {"sms": None}, "quiet_hours": None}
    ).json
    assert cleared["channels"] == ALL_ON and cleared["quiet_hours"] is None
    assert cleared["categories"][1]["channels"]["email"] is False
    with organization_scope(org.id):
        rows = db.session.scalars(select(Preference).where(Preference.recipient_id == recipient.id))
        assert {(p.category_id is None, p.channel.value, p.enabled) for p in rows} == {
            (False, "email", False),
            (False, "sms", True),
        }


def test_the_get_document_can_be_sent_back(org, api, make_recipient, categories):
    recipient = make_recipient(org, "u2")
    document = api.get("/recipients/u2/preferences").json
    assert api.put("/recipients/u2/preferences", json=document).json == document
    assert not audit(org, "recipient.preferences_updated")  # nothing was pinned

    document["categories"][1]["channels"]["push"] = False
    response = api.put("/recipients/u2/preferences", json=document)
    assert response.status_code == 200, response.json
    assert response.json["categories"][1]["channels"]["push"] is False
    with organization_scope(org.id):
        rows = db.session.scalars(select(Preference).where(Preference.recipient_id == recipient.id))
        assert [(p.channel.value, p.enabled) for p in rows] == [("push", False)]

    # An all-category switch and a category one in the same request: the category one is
    # kept even though it equals the default, since it differs from what it would inherit.
    both = {
        "channels": {"sms": False},
        "categories": [{"key": "social", "channels": {"sms": True}}],
    }
    prefs = api.put("/recipients/u2/preferences", json=both).json
    assert prefs["channels"]["sms"] is False and prefs["categories"][1]["channels"]["sms"] is True
    # Explicit switches are updated in place (also the all-category one, whose category is
    # NULL) and cleared with null.
    prefs = api.put("/recipients/u2/preferences", json={"channels": {"sms": True}}).json
    assert prefs["channels"]["sms"] is True
    prefs = api.put("/recipients/u2/preferences", json={"channels": {"sms": False}}).json
    assert prefs["channels"]["sms"] is False


def test_unsubscribe_and_resubscribe(org, api, make_recipient):
    make_recipient(org, "u1")
    assert api.put("/recipients/u1/preferences", json={"unsubscribed": True}).json["unsubscribed"]
    assert api.get("/recipients/u1").json["unsubscribed"] is True
    assert audit(org, "recipient.preferences_updated")[0].changes == {"unsubscribed": True}
    again = api.put("/recipients/u1/preferences", json={"unsubscribed": False})
    assert again.json["unsubscribed"] is False
    assert api.get("/recipients/u1").json["unsubscribed"] is False


def test_preference_validation(org, api, make_recipient, categories):
    make_recipient(org, "u1")
    body = assert_problem(
        api.put(
            "/recipients/u1/preferences",
            json={"categories": [{"key": "billing", "channels": {"email": False}}]},
        ),
        422,
        "categories[0].channels.email",
    )
    assert "critical" in body["detail"]
    # Turning a critical category on (or resetting it) is fine.
    on = {"categories": [{"key": "billing", "channels": {"email": True, "sms": None}}]}
    assert api.put("/recipients/u1/preferences", json=on).status_code == 200
    assert_problem(
        api.put("/recipients/u1/preferences", json={"categories": [{"key": "nope"}]}),
        422,
        "categories[0].key",
    )
    assert_problem(
        api.put("/recipients/u1/preferences", json={"channels": {"fax": False}}),
        422,
        "channels.fax",
    )
    assert_problem(
        api.put("/recipients/u1/preferences", json={"quiet_hours": {"start": "25:00"}}),
        422,
        "quiet_hours.start",
    )
    assert_problem(
        api.put(
            "/recipients/u1/preferences", json={"quiet_hours": {"start": "22:00", "end": "22:00"}}
        ),
        422,
        "quiet_hours.end",
    )
    assert_problem(
        api.put(
            "/recipients/u1/preferences",
            json={"quiet_hours": {"start": "22:00+02:00", "end": "07:00"}},
        ),
        422,
        "quiet_hours.start",
    )
    assert_problem(
        api.put("/recipients/u1/preferences", json={"unsubscribed": None}), 422, "unsubscribed"
    )
    assert_problem(api.get("/recipients/ghost/preferences"), 404)
    assert_problem(api.put("/recipients/ghost/preferences", json={}), 404)


def test_preferences_auth_and_tenancy(client, org, api, other_api, make_api, make_recipient):
    make_recipient(org, "u1")
    assert_problem(other_api.get("/recipients/u1/preferences"), 404)
    assert_problem(other_api.put("/recipients/u1/preferences", json={"unsubscribed": True}), 404)
    assert api.get("/recipients/u1/preferences").json["unsubscribed"] is False
    assert_problem(ApiClient(client, None).get("/recipients/u1/preferences"), 401)
    reader = make_api(org, scopes=["recipients:read"])
    assert reader.get("/recipients/u1/preferences").status_code == 200
    assert_problem(reader.put("/recipients/u1/preferences", json={}), 403)
    assert_problem(make_api(org, scopes=["audiences:read"]).get("/recipients/u1/preferences"), 403)


# --- devices ----------------------------------------------------------------------------


def test_devices(org, api, make_recipient):
    make_recipient(org, "u1")
    make_recipient(org, "u2")
    fcm = api.post("/recipients/u1/devices", json={"kind": "fcm", "token": "tok-1"})
    assert fcm.status_code == 201, fcm.json
    assert fcm.json["kind"] == "fcm" and fcm.json["enabled"] and fcm.json["data"] == {}
    assert audit(org, "device.registered")[0].changes == {"recipient": "u1", "kind": "fcm"}
    web = api.post("/recipients/u1/devices", json=WEBPUSH)
    assert web.status_code == 201 and web.json["data"] == WEBPUSH["data"]
    listed = api.get("/recipients/u1/devices").json["data"]
    assert [d["id"] for d in listed] == [web.json["id"], fcm.json["id"]]

    # The same token again is an update, here moving the device to another recipient and
    # enabling it again.
    with organization_scope(org.id):
        db.session.get(Device, fcm.json["id"]).disabled_at = datetime.now(UTC)
        db.session.flush()
    moved = api.post(
        "/recipients/u2/devices", json={"kind": "fcm", "token": "tok-1", "data": {"app": "2.0"}}
    )
    assert moved.json["id"] == fcm.json["id"] and moved.json["enabled"]
    assert moved.json["data"] == {"app": "2.0"}
    assert audit(org, "device.updated")
    assert [d["id"] for d in api.get("/recipients/u1/devices").json["data"]] == [web.json["id"]]

    assert_problem(api.delete(f"/recipients/u1/devices/{fcm.json['id']}"), 404)  # not u1's
    assert api.delete(f"/recipients/u2/devices/{fcm.json['id']}").status_code == 204
    assert audit(org, "device.deleted")[0].target_id == str(fcm.json["id"])
    assert api.get("/recipients/u2/devices").json["data"] == []


def test_device_validation(org, api, make_recipient):
    make_recipient(org, "u1")
    no_keys = {**WEBPUSH, "data": {"keys": {"p256dh": "x"}}}
    assert_problem(api.post("/recipients/u1/devices", json=no_keys), 422, "data.keys.auth")
    assert_problem(
        api.post("/recipients/u1/devices", json={**WEBPUSH, "data": {}}), 422, "data.keys"
    )
    assert_problem(
        api.post("/recipients/u1/devices", json={**WEBPUSH, "token": "http://insecure"}),
        422,
        "token",
    )
    assert_problem(
        api.post("/recipients/u1/devices", json={"kind": "carrier-pigeon", "token": "t"}),
        422,
        "kind",
    )
    assert_problem(
        api.post(
            "/recipients/u1/devices",
            json={"kind": "apns", "token": "t", "data": {"recipient_id": 1}},
        ),
        422,
        "data.recipient_id",
    )
    assert_problem(api.post("/recipients/u1/devices", json={"kind": "fcm", "token": ""}), 422)
    assert_problem(api.post("/recipients/ghost/devices", json={"kind": "fcm", "token": "t"}), 404)
    assert_problem(api.delete("/recipients/u1/devices/99999999999999999999"), 404)
    assert_problem(api.get("/recipients/ghost/devices"), 404)


def test_devices_auth_and_tenancy(client, org, api, other_api, make_api, make_recipient):
    make_recipient(org, "u1")
    device = api.post("/recipients/u1/devices", json={"kind": "apns", "token": "t"}).json
    assert_problem(other_api.get("/recipients/u1/devices"), 404)
    assert_problem(other_api.delete(f"/recipients/u1/devices/{device['id']}"), 404)
    assert_problem(
        other_api.post("/recipients/u1/devices", json={"kind": "fcm", "token": "t"}), 404
    )
    assert_problem(ApiClient(client, None).get("/recipients/u1/devices"), 401)
    reader = make_api(org, scopes=["recipients:read"])
    assert reader.get("/recipients/u1/devices").status_code == 200
    assert_problem(reader.post("/recipients/u1/devices", json={"kind": "fcm", "token": "x"}), 403)
    assert_problem(reader.delete(f"/recipients/u1/devices/{device['id']}"), 403)
    assert len(api.get("/recipients/u1/devices").json["data"]) == 1


# --- widget tokens ----------------------------------------------------------------------


def _secret(org) -> bytes:
    return crypto.decrypt(db.session.get(Organization, org.id).widget_secret_encrypted)


def test_recipient_token(org, api, make_recipient):
    make_recipient(org, "u1")
    before = datetime.now(UTC).replace(microsecond=0)
    response = api.post("/recipients/u1/token")
    assert response.status_code == 200, response.json
    token = response.json["token"]
    claims = jwt.decode(token, _secret(org), algorithms=["HS256"], audience="whistle-widget")
    assert claims["sub"] == "u1" and claims["org"] == org.id
    assert claims["exp"] - claims["iat"] == 3600 and claims["iat"] >= before.timestamp()
    expires_at = datetime.fromisoformat(response.json["expires_at"])
    assert expires_at == datetime.fromtimestamp(claims["exp"], UTC)

    verified = verify_recipient_token(token)
    assert (verified.organization_id, verified.external_id) == (org.id, "u1")
    assert verified.expires_at == expires_at

    short = api.post("/recipients/u1/token", json={"ttl_seconds": 60}).json
    claims = jwt.decode(
        short["token"], _secret(org), algorithms=["HS256"], audience="whistle-widget"
    )
    assert claims["exp"] - claims["iat"] == 60


def test_recipient_token_errors(client, org, api, other_api, make_api, make_recipient):
    make_recipient(org, "u1")
    assert_problem(api.post("/recipients/u1/token", json={"ttl_seconds": 59}), 422, "ttl_seconds")
    assert_problem(
        api.post("/recipients/u1/token", json={"ttl_seconds": 86401}), 422, "ttl_seconds"
    )
    assert_problem(api.post("/recipients/u1/token", json={"ttl": 60}), 422, "ttl")
    assert_problem(api.post("/recipients/ghost/token"), 404)
    assert_problem(other_api.post("/recipients/u1/token"), 404)
    assert_problem(ApiClient(client, None).post("/recipients/u1/token"), 401)
    assert_problem(make_api(org, scopes=["recipients:read"]).post("/recipients/u1/token"), 403)


def test_verify_recipient_token_refuses_bad_tokens(org, other_org):
    now = datetime.now(UTC)
    token, _ = issue_recipient_token(org.id, "u1", now=now)
    assert verify_recipient_token(token, organization_id=org.id).external_id == "u1"
    with pytest.raises(InvalidRecipientToken):
        verify_recipient_token(token, organization_id=other_org.id)
    expired, _ = issue_recipient_token(org.id, "u1", now=now - timedelta(hours=2))
    with pytest.raises(InvalidRecipientToken, match="expired"):
        verify_recipient_token(expired)
    # Signed with another organization's secret but claiming this one.
    forged = jwt.encode(
        {"sub": "u1", "org": org.id, "aud": "whistle-widget", "iat": 0, "exp": 2**31},
        _secret(other_org),
        algorithm="HS256",
    )
    wrong_audience = jwt.encode(
        {"sub": "u1", "org": org.id, "aud": "whistle-api", "iat": 0, "exp": 2**31},
        _secret(org),
        algorithm="HS256",
    )
    for bad in (forged, wrong_audience, "garbage", token + "x"):
        with pytest.raises(InvalidRecipientToken):
            verify_recipient_token(bad)
    with pytest.raises(Exception, match="ttl_seconds"):
        issue_recipient_token(org.id, "u1", ttl=timedelta(days=2))
