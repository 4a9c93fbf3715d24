"""/ws with a real WebSocket client: auth, origins, live delivery, resume, actions, tabs."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import jwt

from tests.inbox.conftest import deliveries_of, send_in_app, socket, token_for
from tests.pipeline.conftest import assert_counters_match_ledger
from whistle_web.deliveries.models import StatScope


def test_no_auth_frame_within_five_seconds_closes_4001(live_server, inbox):
    with socket(live_server) as ws:
        started = time.monotonic()
        code, reason = ws.close_code()
    assert code == 4001 and "5 seconds" in reason
    assert 4.5 <= time.monotonic() - started < 7


def test_bad_tokens_close_4001(live_server, inbox, other_org):
    org = inbox["org"]
    now = datetime.now(UTC)
    expired = token_for(org.id, "u-1", now=now - timedelta(hours=2), ttl=timedelta(hours=1))
    forged = jwt.encode(
        {"sub": "u-1", "org": org.id, "aud": "whistle-widget", "iat": 1, "exp": 2**40},
        "not-the-widget-secret-of-this-organization",
        algorithm="HS256",
    )
    cases = {
        "no token": {"type": "auth"},
        "garbage": {"type": "auth", "token": "abc.def.ghi"},
        "forged": {"type": "auth", "token": forged},
        "expired": {"type": "auth", "token": expired},
        "unknown recipient": {"type": "auth", "token": token_for(org.id, "nobody")},
        "not auth first": {"type": "read_all"},
    }
    for name, frame in cases.items():
        with socket(live_server) as ws:
            ws.send(frame)
            code, _ = ws.close_code()
            assert code == 4001, name


def test_malformed_first_frames_close_4400(live_server, inbox):
    for raw in (
        "not json",
        "[1, 2]",
        '{"type": "shout"}',
        '{"type": 5}',
        '{"type": "auth", "token": "x", "last_seq": -1}',
        '{"type": "auth", "token": "x", "last_seq": 99999999999999999999}',
        '{"type": "auth", "token": "x", "last_seq": "7"}',
    ):
        with socket(live_server) as ws:
            ws.send(raw)
            assert ws.close_code()[0] == 4400, raw


def test_origin_must_be_allowed(live_server, inbox):
    org = inbox["org"]
    org.allowed_origins = ["https://app.example.com"]
    from whistle_web.extensions import db

    db.session.commit()
    token = token_for(org.id, "u-1")
    with socket(live_server, origin="https://evil.example.net") as ws:
        ws.send({"type": "auth", "token": token})
        assert ws.close_code()[0] == 4003
    for allowed in ("https://app.example.com", "https://APP.example.com:443", None):
        with socket(live_server, origin=allowed) as ws:
            assert ws.auth(token)["recipient"] == "u-1"
    # The server's own origin (WHISTLE_BASE_URL) is always allowed.
    with socket(live_server, origin="http://127.0.0.1:5000") as ws:
        assert ws.auth(token)["recipient"] == "u-1"


def test_ready_then_live_delivery_of_a_triggered_notification(live_server, inbox, jobs):
    org, ada = inbox["org"], inbox["ada"]
    with socket(live_server) as ws:
        ready = ws.auth(token_for(org.id, "u-1"))
        assert ready["seq"] == 0 and ready["unread_count"] == 0
        assert ready["preferences_url"].startswith("http")
        send_in_app(org.id, "u-1", jobs, reason="signup")
        frame = ws.expect("notification")
    (delivery,) = deliveries_of(org.id, ada.id)
    assert frame == {
        "type": "notification",
        "seq": delivery.inbox_seq,
        "id": delivery.id,
        "delivery_id": delivery.id,
        "notification_id": delivery.notification_id,
        "title": "Hello Ada",
        "body": "signup",
        "action_url": None,
        "data": {"reason": "signup"},
        "created_at": delivery.created_at.isoformat(),
        "seen_at": None,
        "read_at": None,
        "archived_at": None,
        "clicked_at": None,
    }
    assert delivery.inbox_seq > 0


def test_other_recipients_items_do_not_reach_the_socket(live_server, inbox, jobs):
    org = inbox["org"]
    with socket(live_server) as ws:
        ws.auth(token_for(org.id, "u-1"))
        send_in_app(org.id, "u-2", jobs, reason="not for ada")
        assert [f for f in ws.frames(quiet=1.0) if f["type"] != "ping"] == []


def test_resume_after_reconnect_sends_what_was_missed(live_server, inbox, jobs):
    org = inbox["org"]
    token = token_for(org.id, "u-1")
    with socket(live_server) as ws:
        ready = ws.auth(token)
        send_in_app(org.id, "u-1", jobs, reason="first")
        first = ws.expect("notification")
    # Offline: two more arrive.
    send_in_app(org.id, "u-1", jobs, reason="second")
    send_in_app(org.id, "u-1", jobs, reason="third")
    with socket(live_server) as ws:
        ready = ws.auth(token, last_seq=first["seq"])
        missed = [ws.expect("notification"), ws.expect("notification")]
        count = ws.expect("unread_count")
    assert [m["body"] for m in missed] == ["second", "third"]
    assert missed[0]["seq"] < missed[1]["seq"] == ready["seq"]
    assert count["count"] == 3


def test_resume_with_too_many_missed_sends_reset(live_server, inbox, jobs, monkeypatch):
    from whistle_web.inbox import services

    monkeypatch.setattr(services, "RESUME_CAP", 1)
    org = inbox["org"]
    send_in_app(org.id, "u-1", jobs, reason="a")
    send_in_app(org.id, "u-1", jobs, reason="b")
    with socket(live_server) as ws:
        ws.auth(token_for(org.id, "u-1"), last_seq=0)
        frames = ws.frames()
    assert [f["type"] for f in frames] == ["reset", "unread_count"], frames
    assert frames[1]["count"] == 2


def test_actions_update_the_ledger_counters_and_every_tab(live_server, inbox, jobs):
    org, ada = inbox["org"], inbox["ada"]
    send_in_app(org.id, "u-1", jobs, reason="one")
    send_in_app(org.id, "u-1", jobs, reason="two")
    first, second = deliveries_of(org.id, ada.id)
    token = token_for(org.id, "u-1")
    with socket(live_server) as tab1, socket(live_server) as tab2:
        assert tab1.auth(token)["unread_count"] == 2
        tab2.auth(token)

        tab1.send({"type": "seen", "ids": [first.id, second.id], "ref": "s1"})
        assert tab1.expect("ack") == {"type": "ack", "ref": "s1"}
        for tab in (tab1, tab2):
            seen = tab.expect("updated", id=first.id)
            assert seen["seen_at"] and seen["read_at"] is None and seen["seq"] > first.inbox_seq

        tab2.send({"type": "read", "id": first.id, "ref": 7})
        assert tab2.expect("ack")["ref"] == 7
        for tab in (tab1, tab2):
            read = tab.expect("updated", id=first.id)
            assert read["read_at"] and read["seq"] > seen["seq"]
            assert tab.expect("unread_count") == {"type": "unread_count", "count": 1}

        tab1.send({"type": "clicked", "id": second.id})
        tab1.expect("ack")
        clicked = tab2.expect("updated", id=second.id)
        assert clicked["clicked_at"] and clicked["read_at"]
        assert tab2.expect("unread_count")["count"] == 0

        tab1.send({"type": "archive", "id": first.id})
        tab1.expect("ack")
        assert tab2.expect("updated", id=first.id)["archived_at"]

        tab1.send({"type": "read", "id": 10**12, "ref": "x"})
        error = tab1.expect("error")
        assert error["code"] == "not_found" and error["ref"] == "x"
        tab1.send({"type": "seen", "ids": "all", "ref": "y"})
        assert tab1.expect("error")["code"] == "invalid"

    first, second = deliveries_of(org.id, ada.id)
    assert str(first.status) == "read" and first.archived_at is not None
    assert str(second.status) == "clicked"
    counts = assert_counters_match_ledger(org.id, StatScope.ORGANIZATION, org.id)
    assert counts["seen"] == 2 and counts["read"] == 2 and counts["clicked"] == 1


def test_read_all_and_events_api_reach_open_sockets(live_server, inbox, jobs, make_api):
    org, ada = inbox["org"], inbox["ada"]
    for reason in ("a", "b", "c"):
        send_in_app(org.id, "u-1", jobs, reason=reason)
    a, b, c = deliveries_of(org.id, ada.id)
    api = make_api(org)
    from whistle_web.extensions import db

    db.session.commit()
    with socket(live_server) as ws:
        ws.auth(token_for(org.id, "u-1"))
        # POST /api/v1/events on an in-app delivery: the socket hears of it.
        response = api.post("/events", json={"delivery_id": a.id, "type": "read"})
        assert response.status_code == 202, response.get_data(as_text=True)
        assert ws.expect("updated", id=a.id)["read_at"]
        assert ws.expect("unread_count")["count"] == 2
        ws.send({"type": "read_all", "ref": "all"})
        ws.expect("ack", ref="all")
        assert {ws.expect("updated")["id"], ws.expect("updated")["id"]} == {b.id, c.id}
        assert ws.expect("unread_count")["count"] == 0
    assert all(d.read_at for d in deliveries_of(org.id, ada.id))
    assert_counters_match_ledger(org.id, StatScope.ORGANIZATION, org.id)


def test_a_rate_limited_in_app_provider_also_numbers_its_items(live_server, inbox, jobs):
    """The general send path (a paced in-app provider) publishes and stores seqs too."""
    from whistle_web.channels.kinds import Channel, ProviderKind
    from whistle_web.extensions import db
    from whistle_web.models import Provider
    from whistle_web.tenancy import organization_scope

    org, ada = inbox["org"], inbox["ada"]
    with organization_scope(org.id):
        provider = Provider(
            channel=Channel.IN_APP,
            kind=ProviderKind.IN_APP,
            name="Paced inbox",
            rate_limit_per_second=1000,
        )
        provider.set_credentials({})
        db.session.add(provider)
        db.session.commit()
    with socket(live_server) as ws:
        ready = ws.auth(token_for(org.id, "u-1"))
        send_in_app(org.id, "u-1", jobs, reason="paced")
        frame = ws.expect("notification")
    (delivery,) = deliveries_of(org.id, ada.id)
    assert frame["id"] == delivery.id and frame["body"] == "paced"
    assert ready["seq"] < frame["seq"] <= delivery.inbox_seq
    with socket(live_server) as ws:
        ws.auth(token_for(org.id, "u-1"), last_seq=ready["seq"])
        assert ws.expect("notification")["id"] == delivery.id


def test_resume_includes_items_whose_state_changed_while_away(live_server, inbox, jobs, client):
    org = inbox["org"]
    token = token_for(org.id, "u-1")
    send_in_app(org.id, "u-1", jobs, reason="old news")
    with socket(live_server) as ws:
        ready = ws.auth(token)
    (item,) = deliveries_of(org.id, inbox["ada"].id)
    # Read in another tab over HTTP while this one was offline.
    response = client.post(
        f"/api/v1/inbox/{item.id}/read", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200
    with socket(live_server) as ws:
        again = ws.auth(token, last_seq=ready["seq"])
        resumed = ws.expect("notification")
        assert ws.expect("unread_count")["count"] == 0
    assert resumed["id"] == item.id and resumed["read_at"] and resumed["seen_at"]
    assert resumed["seq"] == again["seq"] > ready["seq"]


def test_frames_are_not_compressed_even_when_the_client_offers_it(live_server, inbox):
    """permessage-deflate would keep a zlib compressor per socket (most of its memory)."""
    with socket(live_server) as ws:
        offered = ws.ws.request.headers.get("Sec-WebSocket-Extensions") or ""
        assert "permessage-deflate" in offered  # the websockets client offers it by default
        assert ws.ws.response.headers.get("Sec-WebSocket-Extensions") is None
        ready = ws.auth(token_for(inbox["org"].id, "u-1"))
        assert ready["type"] == "ready"
