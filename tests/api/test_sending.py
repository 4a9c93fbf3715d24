"""API: trigger notifications, read and cancel them, record events, list deliveries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from tests.api.conftest import ApiClient, assert_problem
from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, run_jobs
from whistle_web.campaigns.services import create_campaign, launch_campaign
from whistle_web.deliveries import planner
from whistle_web.deliveries.models import Delivery, DeliveryEvent
from whistle_web.extensions import db
from whistle_web.models import SendRequest
from whistle_web.tenancy import organization_scope


@pytest.fixture
def jobs(redis):  # type: ignore[no-untyped-def]
    return lambda: run_jobs(redis)


@pytest.fixture
def welcome(org, make_template):  # type: ignore[no-untyped-def]
    return make_template(org, "welcome", CONTENT)


@pytest.fixture
def ada(org, make_recipient):  # type: ignore[no-untyped-def]
    return make_recipient(org, "u-1", name="Ada")


def _deliveries(org, *where):  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        return list(db.session.scalars(select(Delivery).where(*where).order_by(Delivery.id)))


def _launched_campaign(org):  # type: ignore[no-untyped-def]
    """An in-app campaign to everyone, launched: its id and its run's send request id."""
    with organization_scope(org.id):
        campaign = create_campaign(
            "C", template_key="welcome", channels=["in_app"], audience_type="all", actor=SYSTEM
        )
        launch_campaign(campaign.id, actor=SYSTEM)
        run_id = db.session.scalar(
            select(SendRequest.id).where(SendRequest.campaign_id == campaign.id)
        )
    return campaign.id, run_id


def _send(api, **body):  # type: ignore[no-untyped-def]
    body = {"template": "welcome", "to": ["u-1"], "channels": ["in_app"], **body}
    response = api.post("/notifications", json=body)
    assert response.status_code == 202, response.json
    return response.json


# --- POST/GET/DELETE /notifications ------------------------------------------------------


def test_trigger_to_known_and_inline_recipients(api, welcome, ada, jobs):
    response = api.post(
        "/notifications",
        json={
            "template": "welcome",
            "to": ["u-1", {"external_id": "u-2", "name": "Grace", "email": "G@Example.com"}],
            "channels": ["in_app"],
            "data": {"reason": "signup"},
        },
    )
    assert response.status_code == 202, response.json
    accepted = response.json
    assert accepted["status"] == "pending" and accepted["recipients"] == 2
    assert accepted["template"] == "welcome" and accepted["channels"] == ["in_app"]
    assert accepted["send_at"].endswith("Z") or accepted["send_at"].endswith("+00:00")
    assert api.get("/recipients/u-2").json["email"] == "g@example.com"  # created first

    assert jobs() >= 1
    shown = api.get(f"/notifications/{accepted['id']}").json
    assert shown["status"] == "planned" and shown["planned"] == 2
    assert shown["counts"]["sent"] == 2 and shown["counts"]["total"] == 2
    notifications = shown["notifications"]["data"]
    assert {n["recipient"] for n in notifications} == {"u-1", "u-2"}
    (delivery,) = notifications[0]["deliveries"]
    assert delivery["channel"] == "in_app" and delivery["status"] == "sent"
    assert delivery["sent_at"] and delivery["error"] is None and delivery["failure_reason"] is None

    mine = api.get("/recipients/u-1/notifications").json
    assert [n["send_request_id"] for n in mine["data"]] == [accepted["id"]]
    assert mine["data"][0]["data"] == {"reason": "signup"}
    assert_problem(api.get("/recipients/nobody/notifications"), 404)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": ["u-1", {"external_id": "x", "email": "nope"}]}, "to[1].email"),
        ({"to": [5]}, "to[0]"),
        ({"to": [{"external_id": "x", "timezone": "Mars/Olympus"}]}, "to[0].timezone"),
        ({"to": [{"external_id": "x", "shoe_size": 44}]}, "to[0].shoe_size"),
        ({"to": ["nobody"]}, "to[0]"),
        ({"to": []}, "to"),
        ({"channels": ["pigeon"]}, "channels[0]"),
        ({"send_at": "2030-01-01T09:00:00"}, "send_at"),
        ({"local_time": "25:00"}, "local_time"),
        ({"template": "missing"}, "template"),
        ({"topic": "news"}, "to"),  # two audiences
        ({"to": None}, "to"),  # none
        ({"segment": 0, "to": None}, "segment"),
        ({"data": {"note": "nul\x00"}}, "data.note"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_trigger_validation_names_the_field(api, welcome, ada, body, field, redis):
    payload = {"template": "welcome", "to": ["u-1"], "channels": ["in_app"], **body}
    assert_problem(api.post("/notifications", json=payload), 422, field)
    assert redis.keys("rq:job:*") == []


def test_missing_template_field_and_bad_json(api):
    assert_problem(api.post("/notifications", json={"to": ["u-1"]}), 422, "template")
    assert_problem(api.post("/notifications", data="{", content_type="application/json"), 400)


def test_idempotency_key_sends_once(org, api, welcome, ada, jobs):
    headers = {"Idempotency-Key": "order-42"}
    body = {"template": "welcome", "to": ["u-1"], "channels": ["in_app"]}
    first = api.post("/notifications", json=body, headers=headers)
    again = api.post("/notifications", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json == first.json and again.headers["Idempotent-Replayed"] == "true"
    jobs()
    third = api.post("/notifications", json=body, headers=headers)
    assert third.json == first.json  # the first answer, though the send is planned now
    assert third.headers["Idempotent-Replayed"] == "true"
    assert api.get(f"/notifications/{first.json['id']}").json["status"] == "planned"
    jobs()
    assert [d.status for d in _deliveries(org)] == ["sent"]
    with organization_scope(org.id):
        assert db.session.scalar(select(func.count()).select_from(SendRequest)) == 1
    other = api.post("/notifications", json={**body, "data": {"x": 1}}, headers=headers)
    assert_problem(other, 409)


def test_a_refused_keyed_trigger_holds_no_key(api, welcome, ada):
    """Nothing was sent, so nothing is replayed: the retry is checked again."""
    headers = {"Idempotency-Key": "invite-9"}
    body = {"template": "welcome", "to": ["u-9"], "channels": ["in_app"]}
    assert_problem(api.post("/notifications", json=body, headers=headers), 422, "to[0]")
    assert api.put("/recipients/u-9", json={"name": "Nine"}).status_code in (200, 201)
    sent = api.post("/notifications", json=body, headers=headers)
    assert sent.status_code == 202 and "Idempotent-Replayed" not in sent.headers
    again = api.post("/notifications", json=body, headers=headers)
    assert again.json == sent.json and again.headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("key", [" ", "k" * 256])
def test_an_unusable_idempotency_key_is_422(api, welcome, ada, key):
    body = {"template": "welcome", "to": ["u-1"]}
    response = api.post("/notifications", json=body, headers={"Idempotency-Key": key})
    assert_problem(response, 422, "Idempotency-Key")


def test_a_key_used_outside_the_api_replays_its_send(org, api, welcome, ada):
    """A send request made with a key but no request fingerprint (by another caller of
    trigger(), or before fingerprints were kept) is returned as it is, with its template's
    key."""
    from whistle_web.notifications.services import trigger

    with organization_scope(org.id):
        made = trigger("welcome", to=["u-1"], idempotency_key="from-a-service", actor=SYSTEM)
        made_id = made.id
    body = {"template": "welcome", "to": ["u-1"], "data": {"other": "body"}}
    replay = api.post("/notifications", json=body, headers={"Idempotency-Key": "from-a-service"})
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json["id"] == made_id and replay.json["template"] == "welcome"
    assert replay.json["status"] == "pending"


def test_scheduled_send_reports_and_cancels(org, api, welcome, ada, jobs):
    send_at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    accepted = _send(api, send_at=send_at.isoformat(), local_time="09:30")
    assert datetime.fromisoformat(accepted["send_at"]) == send_at
    assert accepted["local_time"] == "09:30"
    assert jobs() == 0  # not due: nothing enqueued
    cancelled = api.delete(f"/notifications/{accepted['id']}")
    assert cancelled.status_code == 200 and cancelled.json == {"cancelled": 0}
    shown = api.get(f"/notifications/{accepted['id']}").json
    assert shown["status"] == "cancelled" and shown["cancelled_at"]


def test_cancel_stops_planned_deliveries(org, api, welcome, ada, jobs):
    accepted = _send(
        api, to=[{"external_id": "u-2", "email": "u2@example.com"}], channels=["in_app", "email"]
    )
    with organization_scope(org.id):
        # Planned only: the in-app item is written sent by planning itself, the email waits
        # for its channel job (which the planning job would also run for a small trigger).
        planner.plan(accepted["id"])
    assert [(d.channel, d.status) for d in _deliveries(org)] == [
        ("in_app", "sent"),
        ("email", "queued"),
    ]
    response = api.delete(f"/notifications/{accepted['id']}")
    assert response.status_code == 200 and response.json == {"cancelled": 1}
    jobs()
    assert [d.status for d in _deliveries(org)] == ["sent", "cancelled"]
    assert api.delete(f"/notifications/{accepted['id']}").json == {"cancelled": 0}
    with organization_scope(org.id):
        from whistle_web.models import AuditLog

        actions = db.session.scalars(select(AuditLog.action)).all()
    assert "send_request.cancelled" in actions


def test_a_campaign_run_is_not_cancelled_here(org, api, welcome, ada, jobs):
    _, run_id = _launched_campaign(org)
    assert api.get(f"/notifications/{run_id}").json["kind"] == "campaign"
    assert_problem(api.delete(f"/notifications/{run_id}"), 409)


def test_notification_pages(api, welcome, make_recipient, org, jobs):
    for i in range(3):
        make_recipient(org, f"p{i}")
    accepted = _send(api, to=["p0", "p1", "p2"])
    jobs()
    first = api.get(f"/notifications/{accepted['id']}", query_string={"limit": 2}).json
    page1 = first["notifications"]
    assert len(page1["data"]) == 2 and page1["next_cursor"]
    second = api.get(
        f"/notifications/{accepted['id']}",
        query_string={"limit": 2, "cursor": page1["next_cursor"]},
    ).json["notifications"]
    assert len(second["data"]) == 1 and second["next_cursor"] is None
    ids = [n["id"] for n in page1["data"] + second["data"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 3
    assert_problem(api.get(f"/notifications/{accepted['id']}?limit=0"), 422, "limit")
    assert_problem(api.get(f"/notifications/{accepted['id']}?cursor=zzz"), 422, "cursor")


def test_notifications_auth_and_tenancy(client, org, api, other_api, make_api, welcome, ada):
    accepted = _send(api)
    assert_problem(ApiClient(client, None).post("/notifications", json={}), 401)
    assert_problem(ApiClient(client, None).get(f"/notifications/{accepted['id']}"), 401)
    reader = make_api(org, scopes=["notifications:read"])
    assert reader.get(f"/notifications/{accepted['id']}").status_code == 200
    body = {"template": "welcome", "to": ["u-1"]}
    assert_problem(reader.post("/notifications", json=body), 403)
    assert_problem(reader.delete(f"/notifications/{accepted['id']}"), 403)
    writer = make_api(org, scopes=["notifications:write"])
    assert_problem(writer.get(f"/notifications/{accepted['id']}"), 403)
    assert_problem(writer.get("/deliveries"), 403)
    # Another organization sees nothing: 404, never 403.
    assert_problem(other_api.get(f"/notifications/{accepted['id']}"), 404)
    assert_problem(other_api.delete(f"/notifications/{accepted['id']}"), 404)
    assert_problem(other_api.get("/recipients/u-1/notifications"), 404)
    assert_problem(other_api.post("/notifications", json=body), 422, "template")


def test_send_requests_list_newest_first_with_filters(org, api, welcome, ada, make_template, jobs):
    make_template(org, "digest", CONTENT)
    first = _send(api, data={"n": 1})
    later = _send(api, send_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    digest = _send(api, template="digest")
    jobs()
    campaign_id, run_id = _launched_campaign(org)

    def ids(**filters):  # type: ignore[no-untyped-def]
        listed = api.get("/notifications", query_string=filters)
        assert listed.status_code == 200, listed.json
        return [item["id"] for item in listed.json["data"]]

    assert ids() == [run_id, digest["id"], later["id"], first["id"]]
    (item,) = api.get("/notifications", query_string={"template": "digest"}).json["data"]
    assert item["template"] == "digest" and item["kind"] == "trigger"
    assert item["status"] == "planned" and item["planned"] == 1 and item["recipients"] == 1
    assert item["audience"] == "recipients" and item["channels"] == ["in_app"]
    assert "counts" not in item and "notifications" not in item
    assert ids(template="welcome", kind="trigger") == [later["id"], first["id"]]
    assert ids(status="pending", kind="trigger") == [later["id"]]
    assert ids(kind="campaign") == ids(campaign=campaign_id) == [run_id]
    assert ids(template="nope") == []
    # One transaction (the test's) gives every row the same now(): age the first two.
    with organization_scope(org.id):
        db.session.execute(
            update(SendRequest)
            .where(SendRequest.id.in_([first["id"], later["id"]]))
            .values(created_at=SendRequest.created_at - timedelta(hours=2))
        )
        db.session.commit()
    cut = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert ids(since=cut) == [run_id, digest["id"]]
    assert ids(until=cut) == [later["id"], first["id"]]
    # The same fields as GET /notifications/{id}, without its counts and notifications.
    shown = api.get(f"/notifications/{first['id']}").json
    (listed,) = [i for i in api.get("/notifications").json["data"] if i["id"] == first["id"]]
    assert listed == {k: v for k, v in shown.items() if k not in ("counts", "notifications")}


def test_send_requests_list_pages(api, welcome, ada):
    sent = [_send(api)["id"] for _ in range(5)]
    first = api.get("/notifications", query_string={"limit": 2}).json
    assert [i["id"] for i in first["data"]] == sent[:-3:-1] and first["next_cursor"]
    sent.append(_send(api)["id"])  # a new one does not shift the pages
    second = api.get("/notifications", query_string={"limit": 2, "cursor": first["next_cursor"]})
    third = api.get(
        "/notifications", query_string={"limit": 2, "cursor": second.json["next_cursor"]}
    ).json
    assert [i["id"] for i in second.json["data"]] == [sent[2], sent[1]]
    assert [i["id"] for i in third["data"]] == [sent[0]] and third["next_cursor"] is None


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"status": "sent"}, "status"),
        ({"kind": "broadcast"}, "kind"),
        ({"campaign": "x"}, "campaign"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2024-01-02T00:00:00Z", "until": "2024-01-01T00:00:00Z"}, "until"),
        ({"template": "x" * 101}, "template"),
        ({"limit": 0}, "limit"),
        ({"cursor": "nope"}, "cursor"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_send_requests_list_validation(api, filters, field):
    assert_problem(api.get("/notifications", query_string=filters), 422, field)


def test_send_requests_list_auth_and_tenancy(client, org, api, other_api, make_api, welcome, ada):
    ours = _send(api)["id"]
    assert_problem(ApiClient(client, None).get("/notifications"), 401)
    assert_problem(make_api(org, scopes=["notifications:write"]).get("/notifications"), 403)
    assert [
        i["id"]
        for i in make_api(org, scopes=["notifications:read"]).get("/notifications").json["data"]
    ] == [ours]
    assert other_api.get("/notifications").json == {"data": [], "next_cursor": None}


# --- POST /events ------------------------------------------------------------------------


@pytest.fixture
def sent(org, api, welcome, ada, jobs):  # type: ignore[no-untyped-def]
    _send(api)
    jobs()
    (delivery,) = _deliveries(org)
    assert delivery.status == "sent"
    return delivery


def test_events_move_the_ledger_forward_only(org, api, sent):
    read = api.post("/events", json={"delivery_id": sent.id, "type": "read"})
    assert read.status_code == 202, read.json
    assert read.json["status"] == "read" and read.json["changed"] is True
    assert read.json["notification_id"] == sent.notification_id
    late_at = "2020-01-02T03:04:05+02:00"
    late = api.post(
        "/events",
        json={
            "notification_id": sent.notification_id,
            "channel": "in_app",
            "type": "delivered",
            "occurred_at": late_at,
        },
    )
    assert late.status_code == 202
    assert late.json["status"] == "read" and late.json["changed"] is False
    assert late.json["occurred_at"].startswith("2020-01-02T01:04:05")
    custom = api.post(
        "/events", json={"delivery_id": sent.id, "type": "purchase", "data": {"amount": 9.5}}
    )
    assert custom.json["changed"] is False and custom.json["type"] == "purchase"
    archived = api.post("/events", json={"delivery_id": sent.id, "type": "archived"})
    assert archived.json["changed"] is True

    detail = api.get(f"/deliveries/{sent.id}").json
    assert [e["type"] for e in detail["events"]] == ["delivered", "read", "purchase", "archived"]
    assert detail["events"][2]["data"] == {"amount": 9.5}
    # A read implies the earlier steps; the late "delivered" did not move its time.
    assert detail["read_at"] == detail["seen_at"] == detail["delivered_at"]
    assert detail["archived_at"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"type": "read"}, 422, "delivery_id"),
        ({"delivery_id": 1, "notification_id": 1, "type": "read"}, 422, "delivery_id"),
        ({"notification_id": 1, "type": "read"}, 422, "channel"),
        ({"delivery_id": 1, "channel": "email", "type": "read"}, 422, "channel"),
        ({"delivery_id": 1, "type": "Bought It"}, 422, "type"),
        ({"delivery_id": 1, "type": "bounced"}, 422, "type"),
        ({"delivery_id": 1, "type": "complaint"}, 422, "type"),
        ({"delivery_id": 1, "type": "x" * 65}, 422, "type"),
        (
            {"delivery_id": 1, "type": "read", "occurred_at": "2020-01-01T00:00:00"},
            422,
            "occurred_at",
        ),
        (
            {"delivery_id": 1, "type": "read", "occurred_at": "2999-01-01T00:00:00Z"},
            422,
            "occurred_at",
        ),
        ({"delivery_id": 1, "type": "read", "extra": True}, 422, "extra"),
    ],
)
def test_event_validation(api, body, status, field):
    assert_problem(api.post("/events", json=body), status, field)


def test_events_auth_and_tenancy(client, org, api, other_api, make_api, sent):
    body = {"delivery_id": sent.id, "type": "read"}
    assert_problem(ApiClient(client, None).post("/events", json=body), 401)
    assert_problem(make_api(org, scopes=["notifications:read"]).post("/events", json=body), 403)
    assert_problem(other_api.post("/events", json=body), 404)
    body = {"notification_id": sent.notification_id, "channel": "in_app", "type": "read"}
    assert_problem(other_api.post("/events", json=body), 404)
    assert_problem(api.post("/events", json={**body, "channel": "sms"}), 404)
    with organization_scope(org.id):
        assert db.session.scalar(select(func.count()).select_from(DeliveryEvent)) == 0


# --- GET /deliveries ---------------------------------------------------------------------


@pytest.fixture
def mixed(org, api, welcome, make_recipient, jobs):  # type: ignore[no-untyped-def]
    """u-1 has no email (email suppressed), u-2 has one (no email provider: failed)."""
    make_recipient(org, "u-1", name="Ada")
    make_recipient(org, "u-2", name="Grace", email="grace@example.com")
    accepted = _send(api, to=["u-1", "u-2"], channels=["in_app", "email"])
    jobs()
    return accepted


def test_deliveries_list_and_filters(org, api, mixed):
    everything = api.get("/deliveries").json["data"]
    assert len(everything) == 4
    assert [d["id"] for d in everything] == sorted((d["id"] for d in everything), reverse=True)

    def ids(**filters):  # type: ignore[no-untyped-def]
        response = api.get("/deliveries", query_string=filters)
        assert response.status_code == 200, response.json
        return [(d["recipient"], d["channel"], d["status"]) for d in response.json["data"]]

    assert sorted(ids(channel="email")) == [
        ("u-1", "email", "suppressed"),
        ("u-2", "email", "failed"),
    ]
    assert ids(status="sent", recipient="u-2") == [("u-2", "in_app", "sent")]
    assert ids(recipient="nobody") == []
    suppressed = api.get("/deliveries", query_string={"status": "suppressed"}).json["data"][0]
    assert suppressed["suppression_reason"] == "no_address" and suppressed["error"] is None
    failed = api.get("/deliveries", query_string={"status": "failed"}).json["data"][0]
    assert "no enabled email provider" in failed["error"] and failed["failed_at"]
    assert failed["address"] == "grace@example.com"
    now = datetime.now(UTC)
    assert len(ids(since=(now - timedelta(hours=1)).isoformat())) == 4
    assert ids(until=(now - timedelta(hours=1)).isoformat()) == []
    assert ids(campaign=12345) == []


def test_deliveries_pagination(api, mixed):
    first = api.get("/deliveries", query_string={"limit": 3}).json
    assert len(first["data"]) == 3 and first["next_cursor"]
    rest = api.get("/deliveries", query_string={"limit": 3, "cursor": first["next_cursor"]}).json
    assert len(rest["data"]) == 1 and rest["next_cursor"] is None
    assert {d["id"] for d in first["data"]}.isdisjoint({d["id"] for d in rest["data"]})


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"channel": "pigeon"}, "channel"),
        ({"status": "lost"}, "status"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2024-01-01T00:00:00"}, "until"),  # no offset
        ({"since": "2024-01-02T00:00:00Z", "until": "2024-01-01T00:00:00Z"}, "until"),
        ({"campaign": "x"}, "campaign"),
        ({"limit": 500}, "limit"),
        ({"cursor": "nope"}, "cursor"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_deliveries_filter_validation(api, filters, field):
    assert_problem(api.get("/deliveries", query_string=filters), 422, field)


def test_delivery_detail_has_rendered_content(org, api, mixed, other_api, client):
    sent = api.get("/deliveries", query_string={"status": "sent", "recipient": "u-1"}).json
    delivery_id = sent["data"][0]["id"]
    detail = api.get(f"/deliveries/{delivery_id}").json
    assert detail["rendered"] == {"title": "Hello Ada", "body": ""}
    assert detail["recipient"] == "u-1" and detail["events"] == []
    assert detail["provider_message_id"] is None and detail["template_id"]
    assert_problem(api.get("/deliveries/999999"), 404)
    assert_problem(other_api.get(f"/deliveries/{delivery_id}"), 404)
    assert_problem(ApiClient(client, None).get(f"/deliveries/{delivery_id}"), 401)
    assert other_api.get("/deliveries").json["data"] == []


def test_a_retried_event_with_its_key_is_recorded_once(org, api, sent):
    body = {"delivery_id": sent.id, "type": "purchase"}
    headers = {"Idempotency-Key": "evt-1"}
    first = api.post("/events", json=body, headers=headers)
    again = api.post("/events", json=body, headers=headers)
    assert first.status_code == again.status_code == 202 and again.json == first.json
    assert [e["type"] for e in api.get(f"/deliveries/{sent.id}").json["events"]] == ["purchase"]
