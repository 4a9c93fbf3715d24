"""Templates: versions, publish checks, preview and deletion through the API."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from tests.api.conftest import ApiClient, assert_problem
from tests.api.test_audiences import audit, make_campaign, patch
from whistle_web.campaigns.models import AudienceType
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template, TemplateVersion
from whistle_web.preferences.models import Category
from whistle_web.tenancy import organization_scope

CHANNELS = {
    "email": {
        "subject": "Hi {{ recipient.name }}",
        "html": "<p>{{ data.body }}</p><a href='{{ unsubscribe_url }}'>unsubscribe</a>",
        "text": "{{ data.body }}",
    },
    "sms": {"text": "{{ organization.name }}: {{ data.code }}"},
    "push": {"title": "Plan {{ recipient.attributes.plan }}", "body": "{{ data.body }}"},
    "in_app": {"title": "Hello", "body": "{{ data.body }}", "action_url": "/x/{{ data.id }}"},
}


@pytest.fixture
def billing(org):
    with organization_scope(org.id):
        category = Category(key="billing", name="Billing")
        db.session.add(category)
        db.session.flush()
    return category


def create(api: ApiClient, key: str = "welcome", **fields: Any):  # type: ignore[no-untyped-def]
    body = {"key": key, "name": "Welcome", "channels": CHANNELS, **fields}
    return api.post("/templates", json=body)


def test_create_publish_and_new_drafts(org, api, billing):
    created = create(api, category="billing")
    assert created.status_code == 201, created.json
    body = created.json
    assert body["category"] == "billing" and body["published"] is None
    assert body["draft"]["version"] == 1 and body["draft"]["state"] == "draft"
    assert body["draft"]["channels"] == CHANNELS
    assert body["latest_version"] == 1 and body["published_version"] is None
    assert audit(org, "template.created")[0].changes["channels"] == sorted(CHANNELS)

    published = api.post("/templates/welcome/publish")
    assert published.status_code == 200, published.json
    assert published.json["published"]["version"] == 1
    assert published.json["published"]["published_at"] is not None
    assert published.json["draft"] is None and published.json["published_version"] == 1
    assert audit(org, "template.published")[0].changes == {"version": 1, "previous": None}
    assert_problem(api.post("/templates/welcome/publish"), 409)  # nothing new to publish

    sms_only = {"sms": {"text": "v2 {{ data.code }}"}}
    changed = patch(api, "/templates/welcome", {"name": "Hello", "channels": sms_only})
    assert changed.status_code == 200, changed.json
    assert changed.json["name"] == "Hello"
    assert changed.json["published"]["version"] == 1  # untouched until published
    assert changed.json["draft"] == {**changed.json["draft"], "version": 2, "channels": sms_only}
    assert audit(org, "template.updated")[0].changes == {"name": "Hello", "draft_version": 2}

    again = api.post("/templates/welcome/publish").json
    assert again["published"]["version"] == 2 and again["draft"] is None
    versions = api.get("/templates/welcome/versions").json
    assert [(v["version"], v["state"]) for v in versions["data"]] == [
        (2, "published"),
        (1, "archived"),
    ]
    with organization_scope(org.id):
        template = db.session.scalar(select(Template).where(Template.key == "welcome"))
        assert db.session.get(TemplateVersion, template.published_version_id).version == 2

    shown = api.get("/templates/welcome").json
    assert shown["published"]["channels"] == sms_only and shown["latest_version"] == 2


def test_patch_metadata_only_adds_no_version(org, api, billing):
    create(api)
    changed = patch(api, "/templates/welcome", {"category": "billing", "description": "D"})
    assert changed.json["category"] == "billing" and changed.json["latest_version"] == 1
    assert patch(api, "/templates/welcome", {"category": None}).json["category"] is None
    assert_problem(patch(api, "/templates/welcome", {"category": "nope"}), 422, "category")
    assert_problem(patch(api, "/templates/welcome", {"channels": None}), 422, "channels")
    assert_problem(patch(api, "/templates/welcome", {"name": ""}), 422, "name")
    assert_problem(patch(api, "/templates/ghost", {"name": "x"}), 404)


def test_create_validation(api):
    assert_problem(create(api, key="has space"), 422, "key")
    assert_problem(create(api, category="nope"), 422, "category")
    assert_problem(create(api, channels={}), 422, "channels")
    assert_problem(create(api, channels={"fax": {"text": "x"}}), 422, "channels.fax")
    assert_problem(create(api, channels={"email": {"subject": "s"}}), 422, "channels.email")
    assert_problem(create(api, channels={"sms": {"text": ""}}), 422, "channels.sms.text")
    assert_problem(
        create(api, channels={"push": {"title": "t", "body": "b", "icon": "x"}}),
        422,
        "channels.push.icon",
    )
    assert create(api).status_code == 201
    assert_problem(create(api), 409)


@pytest.mark.parametrize(
    ("channels", "field", "fragment"),
    [
        ({"email": {"subject": "Hi {{ recipient.name ", "text": "x"}}, "channels.email.subject",
         "Line 1"),
        ({"sms": {"text": "ok\n{% if data.x %}never closed"}}, "channels.sms.text", "Line 2"),
        ({"push": {"body": "{{ secrets.key }}"}}, "channels.push.body", "'secrets'"),
        ({"in_app": {"body": "ok", "action_url": "{{ data.url | nosuchfilter }}"}},
         "channels.in_app.action_url", "nosuchfilter"),
    ],
)  # fmt: skip
def test_publish_refuses_broken_fields(api, channels, field, fragment):
    create(api, channels=channels)
    body = assert_problem(api.post("/templates/welcome/publish"), 422, field)
    (error,) = [e for e in body["errors"] if e["field"] == field]
    assert fragment in error["message"]
    assert api.get("/templates/welcome").json["published"] is None


def test_publish_allows_loops_and_local_variables(api):
    source = "{% set n = data.items | length %}{% for i in data.items %}{{ loop.index }}{{ i }}"
    create(api, channels={"sms": {"text": source + "{% endfor %}{{ n }} {{ range(2) | list }}"}})
    assert api.post("/templates/welcome/publish").status_code == 200


def test_preview(org, api, make_recipient):
    make_recipient(org, "u1", name="Ada", attributes={"plan": "pro"})
    create(api)
    data = {"body": "<b>bold</b>", "code": "1234", "id": 7}
    stored = api.post("/templates/welcome/preview", json={"data": data, "external_id": "u1"})
    assert stored.status_code == 200, stored.json
    channels = stored.json["channels"]
    assert stored.json["version"] == 1
    assert channels["email"]["subject"] == "Hi Ada"
    assert channels["email"]["html"].startswith("<p>&lt;b&gt;bold&lt;/b&gt;</p>")  # escaped
    assert channels["email"]["text"] == "<b>bold</b>"  # text fields are not
    assert "/t/u/preview" in channels["email"]["html"]
    assert channels["sms"]["text"] == "Acme: 1234"
    assert channels["push"] == {"title": "Plan pro", "body": "<b>bold</b>"}
    assert channels["in_app"]["action_url"] == "/x/7"

    inline = api.post(
        "/templates/welcome/preview",
        json={"recipient": {"name": "Bo", "attributes": {"plan": "free"}}},
    ).json["channels"]
    assert inline["email"]["subject"] == "Hi Bo" and inline["push"]["title"] == "Plan free"
    blank = api.post("/templates/welcome/preview", json={})
    assert blank.status_code == 200 and blank.json["channels"]["sms"]["text"] == "Acme: "

    # An older version can be previewed by number.
    patch(api, "/templates/welcome", {"channels": {"sms": {"text": "v2"}}})
    assert api.post("/templates/welcome/preview", json={}).json == {
        "version": 2,
        "channels": {"sms": {"text": "v2"}},
    }
    assert api.post("/templates/welcome/preview", json={"version": 1}).json["version"] == 1
    assert_problem(api.post("/templates/welcome/preview", json={"version": 9}), 404)


def test_preview_errors(org, api, make_recipient):
    make_recipient(org, "u1")
    create(api, channels={"sms": {"text": "{{ data.n / 0 }}"}, "push": {"body": "{{ x."}})
    body = assert_problem(api.post("/templates/welcome/preview", json={"data": {"n": 1}}), 422)
    fields = {e["field"]: e["message"] for e in body["errors"]}
    assert set(fields) == {"channels.sms.text", "channels.push.body"}
    assert "division" in fields["channels.sms.text"]
    assert fields["channels.push.body"].startswith("line 1")
    assert_problem(
        api.post("/templates/welcome/preview", json={"external_id": "ghost"}), 422, "external_id"
    )
    assert_problem(
        api.post("/templates/welcome/preview", json={"external_id": "u1", "recipient": {}}),
        422,
        "external_id",
    )
    assert_problem(api.post("/templates/welcome/preview", json={"data": []}), 422, "data")
    assert_problem(api.post("/templates/ghost/preview", json={}), 404)


def test_preview_is_sandboxed(api):
    create(api, channels={"sms": {"text": "{{ data.__class__.__mro__ }}"}})
    response = api.post("/templates/welcome/preview", json={"data": {}})
    body = assert_problem(response, 422, "channels.sms.text")
    assert "unsafe" in body["errors"][0]["message"] and "mro" not in response.get_data(as_text=True)


def test_list_and_versions_are_paginated(api):
    for i in range(3):
        create(api, key=f"t{i}")
    first = api.get("/templates", query_string={"limit": 2}).json
    second = api.get("/templates", query_string={"limit": 2, "cursor": first["next_cursor"]}).json
    assert [t["key"] for t in first["data"] + second["data"]] == ["t2", "t1", "t0"]
    assert second["next_cursor"] is None and "published" not in first["data"][0]
    for n in range(2):
        patch(api, "/templates/t0", {"channels": {"sms": {"text": f"v{n + 2}"}}})
    page1 = api.get("/templates/t0/versions", query_string={"limit": 2}).json
    page2 = api.get(
        "/templates/t0/versions", query_string={"limit": 2, "cursor": page1["next_cursor"]}
    ).json
    assert [v["version"] for v in page1["data"] + page2["data"]] == [3, 2, 1]
    assert_problem(api.get("/templates/ghost/versions"), 404)


def test_delete(org, api, make_template, make_send_request):
    create(api)
    api.post("/templates/welcome/publish")
    assert api.delete("/templates/welcome").status_code == 204
    assert audit(org, "template.deleted")[0].changes == {"key": "welcome"}
    assert_problem(api.get("/templates/welcome"), 404)
    assert_problem(api.delete("/templates/welcome"), 404)

    campaign = make_campaign(org, make_template, audience_type=AudienceType.ALL)
    with organization_scope(org.id):
        used = db.session.get(Template, campaign.template_id).key
    assert_problem(api.delete(f"/templates/{used}"), 409)

    sent = make_template(org, "sent")
    make_send_request(org, template=sent)
    assert_problem(api.delete("/templates/sent"), 409)
    assert api.get("/templates/sent").status_code == 200


def test_templates_auth_and_tenancy(client, org, api, other_api, make_api):
    create(api)
    for call in (
        other_api.get("/templates/welcome"),
        patch(other_api, "/templates/welcome", {"name": "X"}),
        other_api.post("/templates/welcome/publish"),
        other_api.get("/templates/welcome/versions"),
        other_api.post("/templates/welcome/preview", json={}),
        other_api.delete("/templates/welcome"),
    ):
        assert_problem(call, 404)
    assert other_api.get("/templates").json["data"] == []
    assert create(other_api).status_code == 201  # keys are per organization

    anonymous = ApiClient(client, None)
    assert_problem(anonymous.get("/templates"), 401)
    assert_problem(anonymous.post("/templates/welcome/publish"), 401)
    reader = make_api(org, scopes=["templates:read"])
    assert reader.get("/templates/welcome").status_code == 200
    assert reader.post("/templates/welcome/preview", json={}).status_code == 200
    assert_problem(create(reader, key="other"), 403)
    assert_problem(reader.post("/templates/welcome/publish"), 403)
    assert_problem(patch(reader, "/templates/welcome", {"name": "X"}), 403)
    assert_problem(reader.delete("/templates/welcome"), 403)
    assert_problem(make_api(org, scopes=["audiences:read"]).get("/templates"), 403)


def test_openapi_documents_the_new_resources(client):
    doc = client.get("/api/schema/openapi.json").json
    paths = doc["paths"]
    for path, method in [
        ("/api/v1/topics", "post"),
        ("/api/v1/topics/{key}/subscriptions", "delete"),
        ("/api/v1/segments/{id}/count", "post"),
        ("/api/v1/categories/{key}", "patch"),
        ("/api/v1/recipients/{external_id}/preferences", "put"),
        ("/api/v1/recipients/{external_id}/devices/{id}", "delete"),
        ("/api/v1/recipients/{external_id}/token", "post"),
        ("/api/v1/templates/{key}/preview", "post"),
    ]:
        assert method in paths[path], (path, method)
    assert "409" in paths["/api/v1/topics"]["post"]["responses"]
    schemas = doc["components"]["schemas"]
    assert schemas["TemplateChannels"]["additionalProperties"] is False
