"""API: providers (credentials write-only, test sends) and API keys (secret shown once)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from sqlalchemy import select

from tests.api.conftest import ApiClient, assert_problem
from tests.factories import PASSWORD
from tests.smtp_sink import SmtpSink, free_port
from whistle_web.accounts.models import Role
from whistle_web.channels import services as channel_services
from whistle_web.channels.base import BaseProvider, SendResult
from whistle_web.channels.in_app import inbox_channel
from whistle_web.channels.kinds import ProviderKind
from whistle_web.extensions import db
from whistle_web.models import AuditLog, Provider
from whistle_web.tenancy import organization_scope

SMTP = {
    "channel": "email",
    "kind": "smtp",
    "name": "Mail",
    "config": {
        "host": "127.0.0.1",
        "port": 2525,
        "use_tls": "none",
        "from_email": "hello@example.com",
        "username": "mailer",
        "password": "s3cret-pa55word",
    },
    "rate_limit_per_second": 5,
}


def _patch(api, path, body):  # type: ignore[no-untyped-def]
    return api.request("PATCH", path, json=body)


def _stored(org, provider_id):  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        provider = db.session.get(Provider, provider_id)
        db.session.refresh(provider)
        return provider.settings, provider.get_credentials()


# --- providers ---------------------------------------------------------------------------


def test_create_splits_settings_from_credentials(org, api):
    response = api.post("/providers", json=SMTP)
    assert response.status_code == 201, response.json
    body = response.json
    assert body["settings"] == {
        "host": "127.0.0.1",
        "port": 2525,
        "use_tls": "none",
        "from_email": "hello@example.com",
    }
    assert body["credentials_set"] == ["password", "username"]
    assert body["rate_limit_per_second"] == 5 and body["priority"] == 100 and body["enabled"]
    assert "s3cret-pa55word" not in response.get_data(as_text=True)
    assert "mailer" not in response.get_data(as_text=True)
    _settings, credentials = _stored(org, body["id"])
    assert credentials == {"username": "mailer", "password": "s3cret-pa55word"}
    assert api.get(f"/providers/{body['id']}").json == body
    with organization_scope(org.id):
        entry = db.session.scalar(select(AuditLog).where(AuditLog.action == "provider.created"))
    assert "s3cret-pa55word" not in json.dumps(entry.changes)
    assert entry.changes["credentials"] == ["password", "username"]


def test_kind_specific_secrets(api):
    twilio = {
        "channel": "sms",
        "kind": "twilio",
        "name": "Twilio",
        "config": {
            "account_sid": "AC" + "0" * 32,
            "auth_token": "tok",
            "from_number": "+14155550100",
        },
    }
    body = api.post("/providers", json=twilio).json
    assert body["settings"] == {"from_number": "+14155550100"}
    assert body["credentials_set"] == ["account_sid", "auth_token"]
    inbox = api.post(
        "/providers", json={"channel": "in_app", "kind": "in_app", "name": "Inbox"}
    ).json
    assert inbox["settings"] == {} and inbox["credentials_set"] == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"config": {"port": 2525, "from_email": "a@b.co"}}, "config.host"),
        ({"config": {**SMTP["config"], "port": 70000}}, "config.port"),
        ({"config": {**SMTP["config"], "from_email": "nope"}}, "config.from_email"),
        ({"config": {**SMTP["config"], "username": None}}, "config.username"),
        ({"channel": "sms"}, "channel"),
        ({"kind": "carrier-pigeon"}, "kind"),
        ({"name": ""}, "name"),
        ({"rate_limit_per_second": 0}, "rate_limit_per_second"),
        ({"priority": -1}, "priority"),
        ({"config": "host=x"}, "config"),
        ({"secret": "x"}, "secret"),
    ],
)
def test_create_validation(api, change, field):
    assert_problem(api.post("/providers", json={**SMTP, **change}), 422, field)


def test_provider_kinds_validate_their_config(api):
    body = {
        "channel": "sms",
        "kind": "twilio",
        "name": "T",
        "config": {"account_sid": "nope", "auth_token": "t", "from_number": "555"},
    }
    problem = assert_problem(api.post("/providers", json=body), 422)
    assert {e["field"] for e in problem["errors"]} == {"config.account_sid", "config.from_number"}
    webhook = {"channel": "webhook", "kind": "webhook", "name": "W", "config": {"url": "ftp://x"}}
    problem = assert_problem(api.post("/providers", json=webhook), 422)
    assert {e["field"] for e in problem["errors"]} == {"config.url", "config.signing_secret"}


def test_names_are_unique(api):
    assert api.post("/providers", json=SMTP).status_code == 201
    assert_problem(api.post("/providers", json=SMTP), 422, "name")


def test_patch_keeps_omitted_credentials(org, api):
    created = api.post("/providers", json=SMTP).json
    path = f"/providers/{created['id']}"
    patched = _patch(api, path, {"config": {"port": 2526, "password": "n3w"}, "priority": 5})
    assert patched.status_code == 200, patched.json
    assert patched.json["settings"]["port"] == 2526 and patched.json["priority"] == 5
    assert patched.json["credentials_set"] == ["password", "username"]
    _settings, credentials = _stored(org, created["id"])
    assert credentials == {"username": "mailer", "password": "n3w"}
    # null removes a key (and the rate limit); omitted fields stay.
    patched = _patch(api, path, {"config": {"use_tls": None}, "rate_limit_per_second": None}).json
    assert "use_tls" not in patched["settings"] and patched["rate_limit_per_second"] is None
    assert patched["name"] == "Mail" and patched["enabled"] is True
    patched = _patch(api, path, {"enabled": False, "name": "Mail 2", "priority": None}).json
    assert patched["enabled"] is False and patched["name"] == "Mail 2" and patched["priority"] == 5
    with organization_scope(org.id):
        changes = db.session.scalars(
            select(AuditLog.changes).where(AuditLog.action == "provider.updated")
        ).all()
    assert {"config": ["password", "port"], "priority": 5} in changes
    assert "n3w" not in json.dumps(changes)


def test_patch_validation(api):
    created = api.post("/providers", json=SMTP).json
    other = api.post("/providers", json={**SMTP, "name": "Other"}).json
    path = f"/providers/{created['id']}"
    assert_problem(_patch(api, path, {"config": {"port": "x"}}), 422, "config.port")
    assert_problem(_patch(api, path, {"config": {"host": None}}), 422, "config.host")
    assert_problem(_patch(api, path, {"name": "Other"}), 422, "name")
    assert_problem(_patch(api, path, {"kind": "ses"}), 422, "kind")  # immutable
    assert _patch(api, f"/providers/{other['id']}", {"name": "Other"}).status_code == 200
    assert api.get(path).json == created


def test_list_filter_paginate_delete(api):
    ids = [api.post("/providers", json={**SMTP, "name": f"Mail {i}"}).json["id"] for i in range(3)]
    inbox = api.post("/providers", json={"channel": "in_app", "kind": "in_app", "name": "Inbox"})
    first = api.get("/providers", query_string={"limit": 2, "channel": "email"}).json
    assert [p["id"] for p in first["data"]] == [ids[2], ids[1]]
    rest = api.get(
        "/providers", query_string={"limit": 2, "channel": "email", "cursor": first["next_cursor"]}
    ).json
    assert [p["id"] for p in rest["data"]] == [ids[0]] and rest["next_cursor"] is None
    assert len(api.get("/providers").json["data"]) == 4
    assert_problem(api.get("/providers", query_string={"channel": "fax"}), 422, "channel")
    assert api.delete(f"/providers/{inbox.json['id']}").status_code == 204
    assert_problem(api.get(f"/providers/{inbox.json['id']}"), 404)
    assert_problem(api.delete(f"/providers/{inbox.json['id']}"), 404)


def test_providers_auth_and_tenancy(client, org, api, other_api, make_api):
    created = api.post("/providers", json=SMTP).json
    path = f"/providers/{created['id']}"
    assert_problem(ApiClient(client, None).get("/providers"), 401)
    reader = make_api(org, scopes=["providers:read"])
    assert reader.get(path).status_code == 200
    assert_problem(reader.post("/providers", json=SMTP), 403)
    assert_problem(_patch(reader, path, {"priority": 1}), 403)
    assert_problem(reader.delete(path), 403)
    assert_problem(reader.post(f"{path}/test", json={"to": "a@example.com"}), 403)
    assert_problem(make_api(org, scopes=["providers:write"]).get("/providers"), 403)
    for response in (
        other_api.get(path),
        _patch(other_api, path, {"priority": 1}),
        other_api.delete(path),
        other_api.post(f"{path}/test", json={"to": "a@example.com"}),
    ):
        assert_problem(response, 404)
    assert other_api.get("/providers").json["data"] == []


# --- test sends --------------------------------------------------------------------------


def test_smtp_test_send_reaches_the_server(org, api):
    with SmtpSink() as sink:
        config = {**SMTP["config"], "port": sink.port, "username": None, "password": None}
        created = api.post("/providers", json={**SMTP, "config": config}).json
        response = api.post(f"/providers/{created['id']}/test", json={"to": "Ops@Example.com"})
        assert response.status_code == 200, response.json
        assert response.json["ok"] is True, response.json
        (message,) = sink.messages
    assert message["To"] == "ops@example.com"
    assert message["Subject"] == "Whistle test message"
    with organization_scope(org.id):
        entry = db.session.scalar(select(AuditLog).where(AuditLog.action == "provider.tested"))
    assert entry.changes["ok"] is True


def test_a_failing_provider_reports_the_error(api):
    config = {**SMTP["config"], "port": free_port()}  # nothing listens there
    created = api.post("/providers", json={**SMTP, "config": config}).json
    response = api.post(f"/providers/{created['id']}/test", json={"to": "ops@example.com"})
    assert response.status_code == 200
    assert response.json["ok"] is False and response.json["error"]
    assert response.json["provider_message_id"] is None


def test_in_app_test_send_publishes(org, api, make_recipient, redis):
    recipient = make_recipient(org, "u-1")
    created = api.post(
        "/providers", json={"channel": "in_app", "kind": "in_app", "name": "Inbox"}
    ).json
    pubsub = redis.pubsub()
    pubsub.subscribe(inbox_channel(org.id, recipient.id))
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    response = api.post(f"/providers/{created['id']}/test", json={"to": "u-1"})
    assert response.json["ok"] is True, response.json
    message = pubsub.get_message(timeout=2)
    pubsub.close()
    assert json.loads(message["data"])["title"] == "Whistle test message"
    assert_problem(api.post(f"/providers/{created['id']}/test", json={"to": "nobody"}), 422, "to")


@pytest.mark.parametrize(
    ("provider", "to"),
    [
        (SMTP, "not-an-address"),
        (SMTP, None),
        (
            {
                "channel": "sms",
                "kind": "twilio",
                "name": "T",
                "config": {"account_sid": "AC" + "0" * 32, "auth_token": "t", "from_number": "+15"},
            },
            "555-0100",
        ),
    ],
)
def test_test_send_validates_the_address(api, provider, to):
    created = api.post("/providers", json=provider)
    assert created.status_code == 201, created.json
    body = {} if to is None else {"to": to}
    assert_problem(api.post(f"/providers/{created.json['id']}/test", json=body), 422, "to")


class _Slow(BaseProvider):
    kind = ProviderKind.IN_APP

    def send_batch(self, messages: Any) -> list[SendResult]:
        time.sleep(1)
        return [SendResult.sent(m.delivery_id, "late") for m in messages]


def test_test_send_gives_up_after_its_budget(org, api, make_recipient, monkeypatch):
    make_recipient(org, "u-1")
    created = api.post(
        "/providers", json={"channel": "in_app", "kind": "in_app", "name": "Inbox"}
    ).json
    monkeypatch.setattr(channel_services, "TEST_BUDGET_SECONDS", 0.2)
    monkeypatch.setattr(channel_services, "provider_class", lambda kind: _Slow)
    started = time.monotonic()
    response = api.post(f"/providers/{created['id']}/test", json={"to": "u-1"})
    assert time.monotonic() - started < 0.9
    assert response.status_code == 200
    assert response.json == {
        "ok": False,
        "provider_message_id": None,
        "error": "No answer from the provider within 0.2 s.",
    }


# --- API keys ----------------------------------------------------------------------------


def test_create_list_and_revoke_keys(client, org, api):
    created = api.post("/api-keys", json={"name": "CI", "scopes": ["recipients:read"]})
    assert created.status_code == 201, created.json
    key = created.json
    assert key["secret"].startswith(key["prefix"]) and key["scopes"] == ["recipients:read"]
    assert key["revoked_at"] is None and key["last_used_at"] is None

    ci = ApiClient(client, key["secret"])
    assert ci.get("/recipients").status_code == 200
    assert_problem(ci.get("/api-keys"), 403)

    listed = api.get("/api-keys").json
    text = json.dumps(listed)
    assert key["secret"] not in text and "secret" not in text
    entry = next(k for k in listed["data"] if k["id"] == key["id"])
    assert entry["last_used_at"] is not None and entry["prefix"] == key["prefix"]
    first = api.get("/api-keys", query_string={"limit": 1}).json
    assert [k["id"] for k in first["data"]] == [key["id"]] and first["next_cursor"]

    revoked = api.delete(f"/api-keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json["revoked_at"]
    assert "secret" not in revoked.json
    assert_problem(ci.get("/recipients"), 401)  # at once
    assert api.delete(f"/api-keys/{key['id']}").json["revoked_at"] == revoked.json["revoked_at"]
    with organization_scope(org.id):
        actions = set(db.session.scalars(select(AuditLog.action)))
    assert {"api_key.created", "api_key.revoked"} <= actions


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "scopes": ["root"]}, "scopes[0]"),
        ({"name": "x", "scopes": []}, "scopes"),
        ({"name": "", "scopes": ["recipients:read"]}, "name"),
        ({"scopes": ["recipients:read"]}, "name"),
        ({"name": "x", "scopes": ["recipients:read"], "secret": "mine"}, "secret"),
    ],
)
def test_key_validation(api, body, field):
    assert_problem(api.post("/api-keys", json=body), 422, field)


def test_keys_need_api_keys_manage_and_grant_only_held_scopes(client, org, make_api, make_user):
    manager = make_api(org, scopes=["api_keys:manage", "recipients:read"])
    ok = manager.post("/api-keys", json={"name": "r", "scopes": ["recipients:read"]})
    assert ok.status_code == 201
    body = {"name": "w", "scopes": ["providers:write"]}
    assert "providers:write" in assert_problem(manager.post("/api-keys", json=body), 403)["detail"]
    assert_problem(make_api(org, scopes=["recipients:read"]).get("/api-keys"), 403)
    assert_problem(ApiClient(client, None).get("/api-keys"), 401)

    def staff(role: Role) -> ApiClient:
        email = f"{role.value}@example.com"
        make_user(email, org=org, role=role)
        login = client.post("/api/v1/auth/token", json={"email": email, "password": PASSWORD})
        return ApiClient(client, login.json["access_token"])

    assert_problem(staff(Role.EDITOR).get("/api-keys"), 403)
    admin = staff(Role.ADMIN)
    assert admin.get("/api-keys").status_code == 200
    made = admin.post("/api-keys", json={"name": "by admin", "scopes": ["providers:write"]})
    assert made.status_code == 201


def test_other_organizations_keys_are_404(org, api, other_api):
    key = api.post("/api-keys", json={"name": "CI", "scopes": ["recipients:read"]}).json
    assert_problem(other_api.delete(f"/api-keys/{key['id']}"), 404)
    assert key["id"] not in [k["id"] for k in other_api.get("/api-keys").json["data"]]


def test_create_provider_is_idempotent_with_a_key(api):
    headers = {"Idempotency-Key": "provider-1"}
    first = api.post("/providers", json=SMTP, headers=headers)
    again = api.post("/providers", json=SMTP, headers=headers)
    assert first.status_code == again.status_code == 201 and again.json == first.json
    assert len(api.get("/providers").json["data"]) == 1
