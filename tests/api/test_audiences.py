"""Topics and subscriptions, categories and segments through the API."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from tests.api.conftest import ApiClient, assert_problem
from whistle_web.audiences.models import Segment, Topic
from whistle_web.campaigns.models import AudienceType, Campaign
from whistle_web.extensions import db
from whistle_web.organizations.models import AuditLog
from whistle_web.tenancy import organization_scope


def audit(org: Any, action: str) -> list[AuditLog]:
    with organization_scope(org.id):
        return list(
            db.session.scalars(
                select(AuditLog).where(AuditLog.action == action).order_by(AuditLog.id)
            )
        )


def patch(api: ApiClient, path: str, body: Any):  # type: ignore[no-untyped-def]
    return api.request("PATCH", path, json=body)


def make_campaign(org: Any, make_template: Any, **audience: Any) -> Campaign:
    template = make_template(org)
    with organization_scope(org.id):
        campaign = Campaign(name="Launch", template_id=template.id, channels=["email"], **audience)
        db.session.add(campaign)
        db.session.flush()
    return campaign


# --- topics -----------------------------------------------------------------------------


def test_topic_crud(org, api):
    created = api.post("/topics", json={"key": "news", "name": "News", "description": "Weekly"})
    assert created.status_code == 201, created.json
    assert created.json["key"] == "news" and created.json["subscribers"] == 0
    assert audit(org, "topic.created")[0].changes == {"key": "news", "name": "News"}

    assert api.get("/topics/news").json["description"] == "Weekly"
    changed = patch(api, "/topics/news", {"name": "The news"})
    assert changed.status_code == 200
    assert changed.json["name"] == "The news" and changed.json["description"] == "Weekly"
    assert audit(org, "topic.updated")[0].changes == {"name": "The news"}

    assert api.delete("/topics/news").status_code == 204
    assert audit(org, "topic.deleted")
    assert_problem(api.get("/topics/news"), 404)
    assert_problem(api.delete("/topics/news"), 404)


def test_topic_validation_and_duplicates(api):
    body = assert_problem(api.post("/topics", json={"key": "bad key", "name": ""}), 422)
    assert {e["field"] for e in body["errors"]} == {"key", "name"}
    assert_problem(
        api.post("/topics", json={"key": "k", "name": "N", "color": "red"}), 422, "color"
    )
    assert_problem(api.post("/topics", json={"key": "k", "name": "N\x00"}), 422, "name")
    assert api.post("/topics", json={"key": "k", "name": "N"}).status_code == 201
    assert_problem(api.post("/topics", json={"key": "k", "name": "Again"}), 409)
    assert_problem(patch(api, "/topics/k", {"name": None}), 422, "name")
    assert_problem(patch(api, "/topics/k", {"key": "other"}), 422, "key")


def test_topic_list_is_paginated(api):
    for i in range(5):
        api.post("/topics", json={"key": f"t{i}", "name": f"Topic {i}"})
    first = api.get("/topics", query_string={"limit": 2}).json
    assert [t["key"] for t in first["data"]] == ["t4", "t3"]
    second = api.get("/topics", query_string={"limit": 2, "cursor": first["next_cursor"]}).json
    third = api.get("/topics", query_string={"limit": 2, "cursor": second["next_cursor"]}).json
    assert [t["key"] for t in second["data"] + third["data"]] == ["t2", "t1", "t0"]
    assert third["next_cursor"] is None
    assert_problem(api.get("/topics", query_string={"limit": 500}), 422, "limit")


def test_subscriptions(org, api, make_recipient):
    for external_id in ("u1", "u2", "u3"):
        make_recipient(org, external_id)
    api.post("/topics", json={"key": "news", "name": "News"})

    added = api.post("/topics/news/subscriptions", json={"recipients": ["u1", "u2"]})
    assert added.status_code == 200 and added.json == {"topic": "news", "added": 2}
    again = api.post("/topics/news/subscriptions", json={"recipients": ["u2", "u3", "u3"]})
    assert again.json["added"] == 1  # already subscribed is fine
    assert api.get("/topics/news").json["subscribers"] == 3
    assert [a.changes for a in audit(org, "topic.subscribed")] == [
        {"recipients": 2, "added": 2},
        {"recipients": 2, "added": 1},
    ]

    page1 = api.get("/topics/news/subscriptions", query_string={"limit": 2}).json
    assert [s["external_id"] for s in page1["data"]] == ["u3", "u2"]
    page2 = api.get(
        "/topics/news/subscriptions", query_string={"limit": 2, "cursor": page1["next_cursor"]}
    ).json
    assert [s["external_id"] for s in page2["data"]] == ["u1"] and page2["next_cursor"] is None

    mine = api.get("/recipients/u2/subscriptions").json
    assert [(s["topic"], s["name"]) for s in mine["data"]] == [("news", "News")]

    removed = api.delete("/topics/news/subscriptions", json={"recipients": ["u1", "u1"]})
    assert removed.status_code == 200 and removed.json == {"topic": "news", "removed": 1}
    assert api.delete("/topics/news/subscriptions", json={"recipients": ["u1"]}).json == {
        "topic": "news",
        "removed": 0,
    }
    assert audit(org, "topic.unsubscribed")[0].changes == {"recipients": 1, "removed": 1}
    assert api.get("/recipients/u1/subscriptions").json["data"] == []


def test_subscription_errors(org, api, make_recipient):
    make_recipient(org, "u1")
    api.post("/topics", json={"key": "news", "name": "News"})
    body = assert_problem(
        api.post("/topics/news/subscriptions", json={"recipients": ["u1", "ghost", "u1", "x"]}),
        422,
    )
    assert [e["field"] for e in body["errors"]] == ["recipients[1]", "recipients[3]"]
    assert api.get("/topics/news").json["subscribers"] == 0  # nothing changed
    assert_problem(
        api.delete("/topics/news/subscriptions", json={"recipients": ["ghost"]}),
        422,
        "recipients[0]",
    )
    assert_problem(api.post("/topics/news/subscriptions", json={"recipients": []}), 422)
    too_many = {"recipients": [f"r{i}" for i in range(1001)]}
    assert_problem(api.post("/topics/news/subscriptions", json=too_many), 422, "recipients")
    assert_problem(api.post("/topics/nope/subscriptions", json={"recipients": ["u1"]}), 404)
    assert_problem(api.get("/recipients/ghost/subscriptions"), 404)


def test_a_topic_a_campaign_targets_cannot_be_deleted(org, api, make_template):
    api.post("/topics", json={"key": "news", "name": "News"})
    with organization_scope(org.id):
        topic_id = db.session.scalar(select(Topic.id).where(Topic.key == "news"))
    make_campaign(org, make_template, audience_type=AudienceType.TOPIC, topic_id=topic_id)
    assert_problem(api.delete("/topics/news"), 409)
    assert api.get("/topics/news").status_code == 200


def test_topics_are_per_organization(org, api, other_api, make_recipient):
    make_recipient(org, "u1")
    api.post("/topics", json={"key": "news", "name": "Mine"})
    api.post("/topics/news/subscriptions", json={"recipients": ["u1"]})
    for call in (
        other_api.get("/topics/news"),
        patch(other_api, "/topics/news", {"name": "Theirs"}),
        other_api.delete("/topics/news"),
        other_api.get("/topics/news/subscriptions"),
        other_api.post("/topics/news/subscriptions", json={"recipients": ["u1"]}),
        other_api.get("/recipients/u1/subscriptions"),
    ):
        assert_problem(call, 404)
    assert other_api.get("/topics").json["data"] == []
    # The same key is free in another organization.
    assert other_api.post("/topics", json={"key": "news", "name": "Theirs"}).status_code == 201
    assert api.get("/topics/news").json["name"] == "Mine"


def test_topic_auth(client, org, make_api):
    anonymous = ApiClient(client, None)
    assert_problem(anonymous.get("/topics"), 401)
    assert_problem(anonymous.post("/topics", json={"key": "k", "name": "N"}), 401)
    reader = make_api(org, scopes=["audiences:read"])
    assert reader.get("/topics").status_code == 200
    assert_problem(reader.post("/topics", json={"key": "k", "name": "N"}), 403)
    assert_problem(reader.delete("/topics/k"), 403)
    assert_problem(reader.post("/topics/k/subscriptions", json={"recipients": ["a"]}), 403)
    other = make_api(org, scopes=["recipients:read"])
    assert_problem(other.get("/topics"), 403)
    assert_problem(other.get("/recipients/u1/subscriptions"), 403)


def test_create_topic_is_idempotent(api):
    headers = {"Idempotency-Key": "topic-1"}
    first = api.post("/topics", json={"key": "k", "name": "N"}, headers=headers)
    again = api.post("/topics", json={"key": "k", "name": "N"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"


# --- categories -------------------------------------------------------------------------


def test_category_crud(org, api):
    created = api.post(
        "/categories",
        json={
            "key": "billing",
            "name": "Billing",
            "default_channels": ["email", "sms", "email"],
            "critical": True,
        },
    )
    assert created.status_code == 201, created.json
    assert created.json["default_channels"] == ["email", "sms"] and created.json["critical"]
    assert audit(org, "category.created")[0].changes["critical"] is True

    changed = patch(api, "/categories/billing", {"default_channels": ["in_app"], "critical": False})
    assert changed.json["default_channels"] == ["in_app"] and changed.json["critical"] is False
    assert audit(org, "category.updated")[0].changes == {
        "default_channels": ["in_app"],
        "critical": False,
    }
    assert api.get("/categories/billing").json["name"] == "Billing"
    api.post("/categories", json={"key": "social", "name": "Social"})
    listed = api.get("/categories", query_string={"limit": 1}).json
    assert [c["key"] for c in listed["data"]] == ["social"] and listed["next_cursor"]
    rest = api.get("/categories", query_string={"cursor": listed["next_cursor"]}).json
    assert [c["key"] for c in rest["data"]] == ["billing"] and rest["next_cursor"] is None

    assert api.delete("/categories/billing").status_code == 204
    assert audit(org, "category.deleted")
    assert_problem(api.get("/categories/billing"), 404)


def test_category_validation(api, other_api, client, org, make_api):
    body = {"key": "c", "name": "C", "default_channels": ["email", "fax"]}
    assert_problem(api.post("/categories", json=body), 422, "default_channels[1]")
    api.post("/categories", json={"key": "c", "name": "C"})
    assert_problem(api.post("/categories", json={"key": "c", "name": "C"}), 409)
    assert_problem(patch(api, "/categories/c", {"default_channels": ["pigeon"]}), 422)
    assert_problem(patch(api, "/categories/c", {"critical": None}), 422, "critical")
    assert_problem(other_api.get("/categories/c"), 404)
    assert_problem(patch(other_api, "/categories/c", {"name": "X"}), 404)
    assert_problem(other_api.delete("/categories/c"), 404)
    assert_problem(ApiClient(client, None).get("/categories"), 401)
    reader = make_api(org, scopes=["audiences:read"])
    assert reader.get("/categories/c").status_code == 200
    assert_problem(reader.post("/categories", json={"key": "d", "name": "D"}), 403)
    assert_problem(patch(reader, "/categories/c", {"name": "D"}), 403)


# --- segments ---------------------------------------------------------------------------

PRO = {"op": "and", "rules": [{"field": "attributes.plan", "operator": "eq", "value": "pro"}]}


def test_segment_crud_and_count(org, api, make_recipient):
    make_recipient(org, "a", attributes={"plan": "pro"})
    make_recipient(org, "b", attributes={"plan": "free"})
    make_recipient(org, "c", attributes={"plan": "pro"})
    created = api.post("/segments", json={"name": "Pro", "rules": PRO})
    assert created.status_code == 201, created.json
    segment_id = created.json["id"]
    assert created.json["rules"] == PRO
    assert audit(org, "segment.created")[0].target_id == str(segment_id)

    counted = api.post(f"/segments/{segment_id}/count")
    assert counted.status_code == 200 and counted.json == {"count": 2}

    free = {"op": "or", "rules": [{"field": "attributes.plan", "operator": "eq", "value": "free"}]}
    changed = patch(api, f"/segments/{segment_id}", {"rules": free, "description": "Free"})
    assert changed.json["rules"] == free and changed.json["name"] == "Pro"
    assert api.post(f"/segments/{segment_id}/count").json == {"count": 1}
    assert set(audit(org, "segment.updated")[0].changes) == {"rules", "description"}

    assert api.get(f"/segments/{segment_id}").json["description"] == "Free"
    assert [s["id"] for s in api.get("/segments").json["data"]] == [segment_id]
    assert api.delete(f"/segments/{segment_id}").status_code == 204
    assert audit(org, "segment.deleted")
    assert_problem(api.get(f"/segments/{segment_id}"), 404)
    assert_problem(api.post(f"/segments/{segment_id}/count"), 404)


def test_segment_topic_rules_count_subscribers(org, api, make_recipient):
    make_recipient(org, "a")
    make_recipient(org, "b")
    api.post("/topics", json={"key": "beta", "name": "Beta"})
    api.post("/topics/beta/subscriptions", json={"recipients": ["b"]})
    rules = {"op": "and", "rules": [{"topic": "beta", "operator": "subscribed"}]}
    segment = api.post("/segments", json={"name": "Beta", "rules": rules}).json
    assert api.post(f"/segments/{segment['id']}/count").json == {"count": 1}


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        ({"op": "and", "rules": [{"field": "password", "operator": "eq", "value": 1}]},
         "rules.rules[0].field"),
        ({"op": "xor", "rules": []}, "rules.op"),
        ({"op": "and", "rules": [{"op": "or", "rules": [{"field": "email", "operator": "gt",
                                                         "value": 3}]}]},
         "rules.rules[0].rules[0].operator"),
        ({"op": "and", "rules": [{"topic": "", "operator": "subscribed"}]}, "rules.rules[0].topic"),
        ([], "rules"),
    ],
)  # fmt: skip
def test_segment_rules_are_validated_by_path(api, rules, field):
    assert_problem(api.post("/segments", json={"name": "S", "rules": rules}), 422, field)


def test_segment_conflicts_and_tenancy(org, api, other_api, make_template, client, make_api):
    first = api.post("/segments", json={"name": "Pro", "rules": PRO}).json
    assert_problem(api.post("/segments", json={"name": "Pro", "rules": PRO}), 409)
    second = api.post("/segments", json={"name": "Other", "rules": PRO}).json
    assert_problem(patch(api, f"/segments/{second['id']}", {"name": "Pro"}), 409)
    assert_problem(
        patch(api, f"/segments/{first['id']}", {"rules": {"op": 1, "rules": []}}), 422, "rules.op"
    )

    make_campaign(org, make_template, audience_type=AudienceType.SEGMENT, segment_id=first["id"])
    assert_problem(api.delete(f"/segments/{first['id']}"), 409)
    with organization_scope(org.id):
        assert db.session.get(Segment, first["id"]) is not None

    for call in (
        other_api.get(f"/segments/{first['id']}"),
        patch(other_api, f"/segments/{first['id']}", {"name": "X"}),
        other_api.delete(f"/segments/{first['id']}"),
        other_api.post(f"/segments/{first['id']}/count"),
    ):
        assert_problem(call, 404)
    assert other_api.get("/segments").json["data"] == []

    assert_problem(ApiClient(client, None).post(f"/segments/{first['id']}/count"), 401)
    reader = make_api(org, scopes=["audiences:read"])
    assert reader.post(f"/segments/{first['id']}/count").status_code == 200
    assert_problem(reader.post("/segments", json={"name": "X", "rules": PRO}), 403)
    assert_problem(reader.delete(f"/segments/{second['id']}"), 403)


def test_a_segment_a_pending_send_uses_cannot_be_deleted(org, api, make_send_request):
    segment = api.post("/segments", json={"name": "Pro", "rules": PRO}).json
    make_send_request(org, audience={"type": "segment", "id": segment["id"]})
    assert_problem(api.delete(f"/segments/{segment['id']}"), 409)


def test_segment_pagination(api):
    ids = [api.post("/segments", json={"name": f"S{i}", "rules": PRO}).json["id"] for i in range(3)]
    first = api.get("/segments", query_string={"limit": 2}).json
    second = api.get("/segments", query_string={"limit": 2, "cursor": first["next_cursor"]}).json
    assert [s["id"] for s in first["data"] + second["data"]] == ids[::-1]
    assert second["next_cursor"] is None


def test_inputs_the_database_cannot_take_are_refused_not_500(api):
    assert_problem(api.get("/segments/99999999999999999999"), 404)
    assert_problem(api.get("/topics/%00"), 404)
    assert_problem(api.get("/categories/%00"), 404)
    infinite = '{"name": "x", "rules": {"field": "attributes.a", "operator": "gt", "value": 1e400}}'
    assert_problem(api.post("/segments", data=infinite, content_type="application/json"), 422)
    huge = {"field": "attributes.a", "operator": "between", "value": [1, 1e300]}
    assert_problem(
        api.post("/segments", json={"name": "x", "rules": {"op": "and", "rules": [huge]}}),
        422,
        "rules.rules[0].value",
    )
    assert_problem(api.post("/topics", json={"key": "k", "name": "a\x00b"}), 422, "name")
