"""API conventions: auth, scopes, problem+json, tenancy, pagination, idempotency, limits."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from tests.api.conftest import ApiClient, assert_problem
from tests.factories import PASSWORD, SYSTEM
from whistle_web.accounts.models import Role
from whistle_web.accounts.services import create_api_key, revoke_api_key
from whistle_web.api.models import IdempotencyRecord
from whistle_web.extensions import db
from whistle_web.tenancy import organization_scope


def test_no_or_bad_credentials_are_401(client, api):
    anonymous = ApiClient(client, None)
    assert_problem(anonymous.get("/recipients"), 401)
    assert_problem(ApiClient(client, "whk_0000000000_nope").get("/recipients"), 401)
    assert_problem(ApiClient(client, "not-a-jwt").get("/recipients"), 401)


def test_a_revoked_key_is_401_at_once(client, org, api):
    assert api.get("/recipients").status_code == 200
    with organization_scope(org.id):
        from whistle_web.accounts.models import ApiKey
        from whistle_web.extensions import db

        key = db.session.scalar(db.select(ApiKey))
        revoke_api_key(key.id, actor=SYSTEM)
    assert_problem(api.get("/recipients"), 401)


def test_a_missing_scope_is_403(org, make_api):
    reader = make_api(org, scopes=["recipients:read"])
    assert reader.get("/recipients").status_code == 200
    body = assert_problem(reader.put("/recipients/u1", json={"name": "x"}), 403)
    assert "recipients:write" in body["detail"]


def test_validation_errors_name_each_field(api):
    response = api.put("/recipients/u1", json={"email": "nope", "attributes": [], "extra": 1})
    body = assert_problem(response, 422)
    fields = {e["field"] for e in body["errors"]}
    assert fields == {"email", "attributes", "extra"}  # unknown fields are rejected


def test_bulk_errors_are_reported_per_item(api):
    response = api.post(
        "/recipients/bulk",
        json={"recipients": [{"external_id": "a"}, {"external_id": "b", "timezone": "Mars/Base"}]},
    )
    assert response.status_code == 200
    assert response.json["created_or_updated"] == 1 and response.json["failed"] == 1
    assert response.json["results"][1]["errors"][0]["field"] == "recipients[1].timezone"


def test_bad_json_and_wrong_content_type(api):
    assert_problem(api.put("/recipients/u1", data="{nope", content_type="application/json"), 400)
    assert_problem(api.put("/recipients/u1", data="name=x", content_type="text/plain"), 415)


def test_oversized_bodies_are_413(app, api, monkeypatch):
    monkeypatch.setitem(app.config, "MAX_CONTENT_LENGTH", 1000)
    body = {"attributes": {"blob": "x" * 2000}}
    assert_problem(api.put("/recipients/u1", json=body), 413)


def test_another_organizations_recipient_is_404(api, other_api):
    assert api.put("/recipients/shared", json={"name": "Mine"}).status_code == 200
    assert_problem(other_api.get("/recipients/shared"), 404)
    assert_problem(other_api.delete("/recipients/shared"), 404)
    assert other_api.put("/recipients/shared", json={"name": "Theirs"}).status_code == 200
    assert api.get("/recipients/shared").json["name"] == "Mine"


def test_upsert_merges_attributes_and_keeps_unsent_fields(api):
    api.put("/recipients/u1", json={"email": "A@Example.com", "attributes": {"plan": "pro"}})
    response = api.put("/recipients/u1", json={"attributes": {"seats": 3}})
    assert response.json["email"] == "a@example.com"
    assert response.json["attributes"] == {"plan": "pro", "seats": 3}


def test_cursor_pagination_is_stable_under_inserts(api):
    for i in range(5):
        api.put(f"/recipients/p{i}", json={})
    first = api.get("/recipients", query_string={"limit": 2}).json
    assert [r["external_id"] for r in first["data"]] == ["p4", "p3"]
    api.put("/recipients/p-new", json={})  # arrives between pages
    second = api.get("/recipients", query_string={"limit": 2, "cursor": first["next_cursor"]}).json
    assert [r["external_id"] for r in second["data"]] == ["p2", "p1"]
    third = api.get("/recipients", query_string={"limit": 2, "cursor": second["next_cursor"]}).json
    assert [r["external_id"] for r in third["data"]] == ["p0"] and third["next_cursor"] is None
    assert_problem(api.get("/recipients", query_string={"cursor": "garbage"}), 422, "cursor")
    assert_problem(api.get("/recipients", query_string={"limit": 0}), 422, "limit")


def test_idempotency_key_replays_and_conflicts(api):
    body = {"recipients": [{"external_id": "i1"}]}
    headers = {"Idempotency-Key": "abc"}
    first = api.post("/recipients/bulk", json=body, headers=headers)
    again = api.post("/recipients/bulk", json=body, headers=headers)
    assert again.status_code == first.status_code and again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true"
    other = api.post(
        "/recipients/bulk", json={"recipients": [{"external_id": "i2"}]}, headers=headers
    )
    assert_problem(other, 409)


def test_an_expired_idempotency_key_runs_again_and_is_replayed_from_then_on(api, org):
    headers = {"Idempotency-Key": "daily-import"}
    first = api.post(
        "/recipients/bulk", json={"recipients": [{"external_id": "i1"}]}, headers=headers
    )
    assert first.status_code == 200
    with organization_scope(org.id):
        db.session.execute(
            update(IdempotencyRecord).values(created_at=func.now() - timedelta(hours=25))
        )
    body = {"recipients": [{"external_id": "i2"}]}  # another request: no conflict any more
    second = api.post("/recipients/bulk", json=body, headers=headers)
    assert second.status_code == 200 and "Idempotent-Replayed" not in second.headers
    assert second.json != first.json
    again = api.post("/recipients/bulk", json=body, headers=headers)
    assert again.json == second.json and again.headers["Idempotent-Replayed"] == "true"
    assert_problem(
        api.post("/recipients/bulk", json={"recipients": [{"external_id": "i1"}]}, headers=headers),
        409,
    )
    with organization_scope(org.id):
        assert db.session.scalar(select(func.count()).select_from(IdempotencyRecord)) == 1


def test_rate_limits_answer_429_with_retry_after(app, api, monkeypatch, redis):
    monkeypatch.setitem(app.config, "WHISTLE_API_RATE_LIMIT", "3 per minute")
    responses = [api.get("/recipients") for _ in range(4)]
    assert [r.status_code for r in responses[:3]] == [200, 200, 200]
    assert responses[0].headers["RateLimit-Limit"] == "3"
    body = assert_problem(responses[3], 429)
    assert int(responses[3].headers["Retry-After"]) > 0
    assert body["status"] == 429


def test_staff_tokens_with_refresh_rotation(client, org, make_user):
    make_user("staff@example.com", org=org, role=Role.VIEWER)
    login = client.post(
        "/api/v1/auth/token", json={"email": "staff@example.com", "password": PASSWORD}
    )
    assert login.status_code == 200, login.json
    tokens = login.json
    staff = ApiClient(client, tokens["access_token"])
    assert staff.get("/recipients").status_code == 200
    assert_problem(staff.put("/recipients/x", json={}), 403)  # a viewer cannot write

    rotated = client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert rotated.status_code == 200 and rotated.json["refresh_token"] != tokens["refresh_token"]
    # Reusing the old refresh token revokes the whole chain, the new one included.
    assert_problem(
        client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}), 401
    )
    assert_problem(
        client.post("/api/v1/auth/refresh", json={"refresh_token": rotated.json["refresh_token"]}),
        401,
    )
    assert_problem(
        client.post("/api/v1/auth/token", json={"email": "staff@example.com", "password": "wrong"}),
        401,
    )


def test_openapi_document_and_offline_swagger_ui(client):
    doc = client.get("/api/schema/openapi.json").json
    assert doc["openapi"] == "3.1.0"
    put = doc["paths"]["/api/v1/recipients/{external_id}"]["put"]
    assert put["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/RecipientIn"
    )
    assert "422" in put["responses"] and put["security"] == [{"bearer": []}]
    assert doc["components"]["schemas"]["RecipientIn"]["additionalProperties"] is False
    page = client.get("/api/schema/swagger-ui/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in html and "unpkg" not in html
    bundle = client.get("/static/vendor/swagger-ui/swagger-ui-bundle.js")
    assert bundle.status_code == 200
    bundle.close()


def test_api_key_secret_never_appears_in_responses(org, api):
    with organization_scope(org.id):
        issued = create_api_key("other", actor=SYSTEM)
    response = api.get("/recipients")
    assert issued.secret not in response.get_data(as_text=True)


@pytest.mark.parametrize("path", ["/recipients/x"])
def test_methods_not_allowed_are_problem_json(api, path):
    assert_problem(api.post(path, json={}), 405)


def test_out_of_range_ids_and_nul_characters_are_not_500s(api):
    assert_problem(api.get("/recipients/a%00b"), 404)
    assert_problem(api.put("/recipients/u1", json={"name": "a\x00b"}), 422, "name")
    assert_problem(
        api.put(
            "/recipients/u1", data='{"attributes": {"x": NaN}}', content_type="application/json"
        ),
        400,
    )


def test_health_is_not_rate_limited(app, client, monkeypatch):  # type: ignore[no-untyped-def]
    """Load balancers' checks spend no budget (the blueprint's limit used to apply)."""
    monkeypatch.setitem(app.config, "WHISTLE_API_RATE_LIMIT", "3 per minute")
    assert [client.get("/api/v1/health").status_code for _ in range(6)] == [200] * 6
    assert "RateLimit-Limit" not in client.get("/api/v1/health").headers


def test_a_console_cookie_neither_authenticates_nor_scopes_an_api_request(
    app, org, other_org, make_user, make_api, make_recipient
):
    from tests.console.conftest import sign_in

    make_recipient(org, "ours")
    make_recipient(other_org, "theirs")
    browser = app.test_client()
    assert sign_in(browser, make_user(org=org).email, PASSWORD).status_code == 302
    assert browser.get("/recipients").status_code == 200  # signed in to the console
    assert_problem(browser.get("/api/v1/recipients"), 401)
    secret = make_api(other_org).token
    listed = browser.get("/api/v1/recipients", headers={"Authorization": f"Bearer {secret}"})
    assert [r["external_id"] for r in listed.json["data"]] == ["theirs"]


def test_an_api_request_never_opens_the_console_session(app, org, make_user, make_api):
    """The cookie is not even decoded for /api/ (Flask's null session), and never set."""
    from flask import request, request_finished, session

    from tests.console.conftest import sign_in

    browser = app.test_client()
    assert sign_in(browser, make_user(org=org).email, PASSWORD).status_code == 302
    secret = make_api(org).token
    seen = []

    def record(sender, response, **extra):  # type: ignore[no-untyped-def]
        seen.append((request.path, type(session._get_current_object()).__name__, response))

    with request_finished.connected_to(record, app):
        browser.get("/api/v1/recipients", headers={"Authorization": f"Bearer {secret}"})
        browser.get("/recipients")
    assert [(path, kind) for path, kind, _ in seen] == [
        ("/api/v1/recipients", "NullSession"),
        ("/recipients", "SecureCookieSession"),
    ]
    assert "Set-Cookie" not in seen[0][2].headers
