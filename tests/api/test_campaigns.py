"""API: campaigns — compose, edit while draft or scheduled, launch, pause, resume, cancel, stats."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from tests.api.conftest import ApiClient, assert_problem
from tests.pipeline.conftest import CONTENT, run_jobs
from whistle_web.audiences.models import Segment, Topic
from whistle_web.extensions import db
from whistle_web.models import AuditLog, Template
from whistle_web.tenancy import organization_scope


@pytest.fixture
def jobs(redis):  # type: ignore[no-untyped-def]
    return lambda: run_jobs(redis)


@pytest.fixture
def audience(org, make_template, make_recipient):  # type: ignore[no-untyped-def]
    make_template(org, "digest", CONTENT)
    return [make_recipient(org, f"c{i}", name=f"C{i}") for i in range(3)]


def _patch(api, path, body):  # type: ignore[no-untyped-def]
    return api.request("PATCH", path, json=body)


def _create(api, **body):  # type: ignore[no-untyped-def]
    body = {
        "name": "Digest",
        "template": "digest",
        "channels": ["in_app"],
        "everyone": True,
        **body,
    }
    response = api.post("/campaigns", json=body)
    assert response.status_code == 201, response.json
    return response.json


def test_create_show_list(api, audience):
    created = _create(api, data={"headline": "Hi"}, local_time="09:00")
    assert created["status"] == "draft" and created["audience"] == "all"
    assert created["template"] == "digest" and created["channels"] == ["in_app"]
    assert created["local_time"] == "09:00" and created["data"] == {"headline": "Hi"}
    assert api.get(f"/campaigns/{created['id']}").json == created

    second = _create(api, name="Two", to=["c1", "c2"], everyone=False)
    assert second["audience"] == "list" and second["to"] == ["c1", "c2"]
    listed = api.get("/campaigns", query_string={"limit": 1}).json
    assert [c["id"] for c in listed["data"]] == [second["id"]]
    rest = api.get("/campaigns", query_string={"limit": 1, "cursor": listed["next_cursor"]}).json
    assert [c["id"] for c in rest["data"]] == [created["id"]] and rest["next_cursor"] is None
    assert api.get("/campaigns", query_string={"status": "sending"}).json["data"] == []
    assert len(api.get("/campaigns", query_string={"status": "draft"}).json["data"]) == 2
    assert_problem(api.get("/campaigns", query_string={"status": "lost"}), 422, "status")


def test_topic_and_segment_audiences(org, api, audience):
    with organization_scope(org.id):
        topic = Topic(key="news", name="News")
        segment = Segment(name="All", rules={"all": []})
        db.session.add_all([topic, segment])
        db.session.flush()
    by_topic = _create(api, topic="news", everyone=False)
    assert by_topic["audience"] == "topic" and by_topic["topic"] == "news"
    by_segment = _create(api, segment=segment.id, everyone=False)
    assert by_segment["audience"] == "segment" and by_segment["segment"] == segment.id


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"everyone": False}, "to"),
        ({"to": ["c1"]}, "to"),  # two audiences
        ({"channels": ["pigeon"]}, "channels[0]"),
        ({"channels": []}, "channels"),
        ({"cron": "every tuesday"}, "cron"),
        ({"cron_timezone": "Mars/Base"}, "cron_timezone"),
        ({"template": "missing"}, "template"),
        ({"segment": 999999, "everyone": False}, "segment"),
        ({"topic": "nope", "everyone": False}, "topic"),
        ({"send_at": "2030-01-01T09:00:00"}, "send_at"),
        ({"name": ""}, "name"),
        ({"data": []}, "data"),
        ({"extra": 1}, "extra"),
    ],
)
def test_create_validation(api, audience, body, field):
    payload = {"name": "D", "template": "digest", "channels": ["in_app"], "everyone": True, **body}
    assert_problem(api.post("/campaigns", json=payload), 422, field)


def test_launch_sends_and_stats_count_the_funnel(org, api, audience, jobs):
    campaign = _create(api, channels=["in_app", "email"])
    launched = api.post(f"/campaigns/{campaign['id']}/launch")
    assert launched.status_code == 200, launched.json
    assert launched.json["status"] == "sending" and launched.json["launched_at"]
    jobs()
    assert api.get(f"/campaigns/{campaign['id']}").json["status"] == "completed"

    deliveries = api.get(
        "/deliveries", query_string={"campaign": campaign["id"], "channel": "in_app"}
    ).json["data"]
    assert len(deliveries) == 3
    for event in ("read", "purchase"):
        response = api.post("/events", json={"delivery_id": deliveries[0]["id"], "type": event})
        assert response.status_code == 202

    stats = api.get(f"/campaigns/{campaign['id']}/stats").json
    assert stats["campaign_id"] == campaign["id"] and stats["status"] == "completed"
    assert stats["targeted"] == 6 and stats["suppressed"] == 3 and stats["queued"] == 3
    assert stats["sent"] == 3 and stats["read"] == 1 and stats["seen"] == 1
    assert stats["suppressed_by_reason"] == {"no_address": 3}
    assert stats["events"] == {"purchase": 1}
    assert stats["rates"]["sent"] == 1.0 and stats["rates"]["read"] == round(1 / 3, 4)
    assert stats["rates"]["conversions"] == {"purchase": round(1 / 3, 4)}
    in_app, email = stats["channels"]["in_app"], stats["channels"]["email"]
    assert (in_app["targeted"], in_app["sent"], in_app["read"]) == (3, 3, 1)
    assert (email["targeted"], email["suppressed"], email["sent"]) == (3, 3, 0)
    assert email["rates"]["sent"] is None  # nothing queued on email
    for key in ("delivered", "clicked", "failed", "bounced"):
        assert key in stats and key in in_app

    # Finished campaigns cannot be edited, deleted, paused or launched again.
    assert_problem(_patch(api, f"/campaigns/{campaign['id']}", {"name": "New"}), 409)
    assert_problem(api.delete(f"/campaigns/{campaign['id']}"), 409)
    assert_problem(api.post(f"/campaigns/{campaign['id']}/pause"), 409)
    assert_problem(api.post(f"/campaigns/{campaign['id']}/launch"), 409)


def test_pause_resume_cancel(org, api, audience, jobs):
    campaign = _create(api)
    path = f"/campaigns/{campaign['id']}"
    assert_problem(api.post(f"{path}/pause"), 409)  # a draft is not sending
    assert api.post(f"{path}/launch").json["status"] == "sending"
    assert api.post(f"{path}/pause").json["status"] == "paused"
    assert_problem(api.post(f"{path}/pause"), 409)
    jobs()
    assert api.get("/deliveries", query_string={"status": "sent"}).json["data"] == []
    assert api.post(f"{path}/resume").json["status"] == "sending"
    jobs()
    assert len(api.get("/deliveries", query_string={"status": "sent"}).json["data"]) == 3

    other = _create(api, name="Other")
    other_path = f"/campaigns/{other['id']}"
    cancelled = api.post(f"{other_path}/cancel")
    assert cancelled.json["status"] == "cancelled" and cancelled.json["cancelled_at"]
    assert_problem(api.post(f"{other_path}/resume"), 409)
    assert_problem(api.post(f"{other_path}/cancel"), 409)
    with organization_scope(org.id):
        actions = set(db.session.scalars(select(AuditLog.action)))
    assert {"campaign.created", "campaign.launched", "campaign.paused"} <= actions
    assert {"campaign.resumed", "campaign.cancelled"} <= actions


def test_patch_a_draft(org, api, audience):
    campaign = _create(api)
    path = f"/campaigns/{campaign['id']}"
    patched = _patch(api, path, {"name": "Renamed", "to": ["c0"], "cron": "0 9 * * MON"})
    assert patched.status_code == 200, patched.json
    body = patched.json
    assert body["name"] == "Renamed" and body["audience"] == "list" and body["to"] == ["c0"]
    assert body["cron"] == "0 9 * * MON" and body["status"] == "draft"
    body = _patch(api, path, {"cron": None, "data": {"a": 1}, "local_time": "08:15"}).json
    assert body["cron"] is None and body["data"] == {"a": 1} and body["local_time"] == "08:15"
    assert body["to"] == ["c0"]  # untouched
    assert _patch(api, path, {}).json["name"] == "Renamed"
    with organization_scope(org.id):
        entry = db.session.scalar(
            select(AuditLog).where(AuditLog.action == "campaign.updated").order_by(AuditLog.id)
        )
    assert entry.changes == {"fields": ["audience_external_ids", "audience_type", "cron", "name"]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"cron": "nope"}, "cron"),
        ({"cron_timezone": "Nowhere/City"}, "cron_timezone"),
        ({"template": "missing"}, "template"),
        ({"topic": "nope"}, "topic"),
        ({"segment": 999999}, "segment"),
        ({"to": ["a"], "everyone": True}, "to"),
        ({"channels": ["pigeon"]}, "channels[0]"),
        ({"local_time": "9am"}, "local_time"),
        ({"status": "sending"}, "status"),  # not writable
    ],
)
def test_patch_validation(api, audience, body, field):
    campaign = _create(api)
    assert_problem(_patch(api, f"/campaigns/{campaign['id']}", body), 422, field)
    assert api.get(f"/campaigns/{campaign['id']}").json == campaign


def test_scheduled_campaigns_are_rescheduled_by_edits(api, audience, jobs):
    later = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    campaign = _create(api, send_at=later.isoformat())
    path = f"/campaigns/{campaign['id']}"
    scheduled = api.post(f"{path}/launch").json
    assert scheduled["status"] == "scheduled"
    assert datetime.fromisoformat(scheduled["next_run_at"]) == later
    sooner = later - timedelta(days=1)
    moved = _patch(api, path, {"send_at": sooner.isoformat(), "name": "Moved"}).json
    assert moved["status"] == "scheduled" and moved["name"] == "Moved"
    assert datetime.fromisoformat(moved["next_run_at"]) == sooner
    assert_problem(_patch(api, path, {"send_at": None}), 422, "send_at")
    assert api.get(path).json["send_at"] == moved["send_at"]  # nothing changed
    weekly = _patch(api, path, {"send_at": None, "cron": "0 9 * * MON"}).json
    assert weekly["status"] == "scheduled" and weekly["cron"] == "0 9 * * MON"
    assert datetime.fromisoformat(weekly["next_run_at"]).weekday() == 0
    assert jobs() == 0  # nothing due
    assert api.delete(path).status_code == 204  # never ran: can be deleted
    assert_problem(api.get(path), 404)


def test_delete_a_draft_and_launch_validation(org, api, audience, make_template):
    campaign = _create(api)
    path = f"/campaigns/{campaign['id']}"
    assert api.delete(path).status_code == 204
    assert_problem(api.delete(path), 404)
    assert_problem(api.post(f"{path}/launch"), 404)
    # The template has no SMS content: launching names the channel.
    make_template(org, "inbox-only", {"in_app": {"title": "Hi", "body": "There"}})
    bad = _create(api, template="inbox-only", channels=["sms"])
    assert_problem(api.post(f"/campaigns/{bad['id']}/launch"), 422, "channels[0]")
    with organization_scope(org.id):
        template = db.session.scalar(select(Template).where(Template.key == "digest"))
        template.published_version_id = None
        db.session.flush()
    fine = _create(api)
    assert_problem(api.post(f"/campaigns/{fine['id']}/launch"), 422, "template")


def test_launch_is_idempotent_with_a_key(api, audience):
    campaign = _create(api)
    headers = {"Idempotency-Key": "launch-1"}
    first = api.post(f"/campaigns/{campaign['id']}/launch", headers=headers)
    again = api.post(f"/campaigns/{campaign['id']}/launch", headers=headers)
    assert first.status_code == again.status_code == 200 and again.json == first.json
    assert_problem(api.post(f"/campaigns/{campaign['id']}/launch"), 409)


def test_campaigns_auth_and_tenancy(client, org, api, other_api, make_api, audience):
    campaign = _create(api)
    path = f"/campaigns/{campaign['id']}"
    anonymous = ApiClient(client, None)
    assert_problem(anonymous.get("/campaigns"), 401)
    assert_problem(anonymous.post(f"{path}/launch"), 401)
    reader = make_api(org, scopes=["campaigns:read"])
    assert reader.get(path).status_code == 200
    assert reader.get(f"{path}/stats").status_code == 200
    assert_problem(reader.post("/campaigns", json={"name": "x"}), 403)
    assert_problem(_patch(reader, path, {"name": "x"}), 403)
    assert_problem(reader.delete(path), 403)
    assert_problem(reader.post(f"{path}/launch"), 403)
    assert_problem(make_api(org, scopes=["campaigns:write"]).get(path), 403)
    for response in (
        other_api.get(path),
        other_api.get(f"{path}/stats"),
        _patch(other_api, path, {"name": "x"}),
        other_api.delete(path),
        other_api.post(f"{path}/launch"),
        other_api.post(f"{path}/pause"),
        other_api.post(f"{path}/resume"),
        other_api.post(f"{path}/cancel"),
    ):
        assert_problem(response, 404)
    assert other_api.get("/campaigns").json["data"] == []
    assert api.get(path).json["status"] == "draft"


def test_create_is_idempotent_with_a_key(api, audience):
    body = {"name": "Once", "template": "digest", "channels": ["in_app"], "everyone": True}
    headers = {"Idempotency-Key": "create-1"}
    first = api.post("/campaigns", json=body, headers=headers)
    again = api.post("/campaigns", json=body, headers=headers)
    assert first.status_code == again.status_code == 201 and again.json == first.json
    assert len(api.get("/campaigns").json["data"]) == 1
    assert_problem(api.post("/campaigns", json={**body, "name": "Twice"}, headers=headers), 409)
