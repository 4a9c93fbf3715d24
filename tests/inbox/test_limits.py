"""/ws limits and liveness: message rate, frame size, sockets per recipient, token expiry,
pings, and the hub surviving a dropped Redis subscription."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from websockets.exceptions import ConnectionClosed

from tests.inbox.conftest import assert_closed_1009, padded, send_in_app, socket, token_for
from whistle_web.inbox import hub as hub_module
from whistle_web.inbox import socket as socket_module


def test_too_many_messages_per_second_closes_4008(live_server, inbox):
    with socket(live_server) as ws:
        ws.auth(token_for(inbox["org"].id, "u-1"))
        for _ in range(int(socket_module.RATE_BURST) + 20):
            try:
                ws.send({"type": "pong"})
            except ConnectionClosed as closed:  # the server may close before the last send
                assert closed.rcvd is not None and closed.rcvd.code == 4008
                return
        assert ws.close_code()[0] == 4008


def test_a_steady_client_within_the_rate_is_not_closed(live_server, inbox):
    with socket(live_server) as ws:
        ws.auth(token_for(inbox["org"].id, "u-1"))
        for i in range(30):
            ws.send({"type": "read_all", "ref": i})
            ws.expect("ack", ref=i)
            time.sleep(0.06)


def test_frames_over_4_kib_close_1009(live_server, inbox):
    with socket(live_server) as ws:
        ws.auth(token_for(inbox["org"].id, "u-1"))
        started = time.monotonic()
        ws.send({"type": "seen", "ids": [1], "pad": "x" * 5000})
        code, reason = ws.close_code()
    assert code == 1009 and reason == "Messages are at most 4096 bytes."
    assert time.monotonic() - started < 2


def test_a_fragmented_message_over_4_kib_closes_1009(live_server, inbox):
    text = padded(socket_module.MAX_MESSAGE_BYTES + 1)
    with socket(live_server) as ws:
        ws.auth(token_for(inbox["org"].id, "u-1"))
        assert assert_closed_1009(ws, [text[i : i + 1000] for i in range(0, len(text), 1000)])


def test_text_is_counted_in_bytes_not_characters(live_server, inbox):
    text = padded(socket_module.MAX_MESSAGE_BYTES + 1, "é")
    assert len(text) < socket_module.MAX_MESSAGE_BYTES
    with socket(live_server) as ws:
        ws.auth(token_for(inbox["org"].id, "u-1"))
        assert assert_closed_1009(ws, text)


def test_a_huge_frame_closes_1009_though_the_client_is_still_sending(live_server, inbox):
    with socket(live_server, max_size=None) as ws:
        ws.auth(token_for(inbox["org"].id, "u-1"))
        assert assert_closed_1009(ws, padded(4 * 2**20))


@pytest.mark.parametrize("char", ["x", "é"])
def test_messages_of_exactly_4_kib_are_served(live_server, inbox, char):
    size = socket_module.MAX_MESSAGE_BYTES
    with socket(live_server) as ws:
        ws.auth(token_for(inbox["org"].id, "u-1"))
        ws.send(padded(size, char, ref="one"))
        ws.expect("ack", ref="one")
        # In fragments too, and the count starts over with each message.
        text = padded(size, char, ref="two")
        ws.ws.send([text[i : i + 700] for i in range(0, len(text), 700)])
        ws.expect("ack", ref="two")
        ws.send(padded(size, char, ref="three"))
        ws.expect("ack", ref="three")


def test_sockets_per_recipient_are_limited(live_server, inbox, app, monkeypatch):
    monkeypatch.setitem(app.config, "WHISTLE_WS_MAX_SOCKETS_PER_RECIPIENT", 2)
    org = inbox["org"]
    token = token_for(org.id, "u-1")
    with socket(live_server) as one, socket(live_server) as two:
        one.auth(token)
        two.auth(token)
        with socket(live_server) as three:
            three.send({"type": "auth", "token": token})
            assert three.close_code()[0] == 4009
        # Another recipient is not affected.
        with socket(live_server) as other:
            assert other.auth(token_for(org.id, "u-2"))["recipient"] == "u-2"
    # Closing frees the slots.
    time.sleep(0.3)
    with socket(live_server) as again:
        assert again.auth(token)["recipient"] == "u-1"


def test_the_socket_closes_4001_when_its_token_expires(live_server, inbox):
    org = inbox["org"]
    soon = datetime.now(UTC) - timedelta(seconds=58)
    short = token_for(org.id, "u-1", ttl=timedelta(seconds=60), now=soon)
    with socket(live_server) as ws:
        ws.auth(short)
        started = time.monotonic()
        code, reason = ws.close_code(timeout=6)
    assert code == 4001 and "expired" in reason
    assert time.monotonic() - started < 5


def test_a_fresh_token_extends_the_socket(live_server, inbox):
    org = inbox["org"]
    soon = datetime.now(UTC) - timedelta(seconds=58)
    with socket(live_server) as ws:
        ws.auth(token_for(org.id, "u-1", ttl=timedelta(seconds=60), now=soon))
        ws.send({"type": "auth", "token": token_for(org.id, "u-1"), "ref": "renew"})
        ws.expect("ack", ref="renew")
        time.sleep(3.5)
        ws.send({"type": "read_all", "ref": "still here"})
        ws.expect("ack", ref="still here")
        # A token of someone else is refused.
        ws.send({"type": "auth", "token": token_for(org.id, "u-2")})
        assert ws.close_code()[0] == 4001


def test_pings_keep_coming(live_server, inbox, monkeypatch):
    monkeypatch.setattr(socket_module, "PING_INTERVAL", 0.3)
    with socket(live_server) as ws:
        ws.auth(token_for(inbox["org"].id, "u-1"))
        assert ws.expect("ping", timeout=2) == {"type": "ping"}
        ws.send({"type": "pong"})
        ws.expect("ping", timeout=2)


def test_the_hub_resubscribes_after_redis_drops_it(live_server, inbox, jobs, redis):
    org = inbox["org"]
    with socket(live_server) as ws:
        ws.auth(token_for(org.id, "u-1"))
        before = hub_module.hub.reconnects
        ours = [
            c
            for c in redis.client_list(_type="pubsub")
            if c.get("name") == hub_module.client_name()
        ]
        assert len(ours) == 1  # one subscription for the whole process
        redis.client_kill_filter(_id=ours[0]["id"])
        send_in_app(org.id, "u-1", jobs, reason="during the outage")
        frame = ws.expect("notification", timeout=10)
        assert frame["body"] == "during the outage"
        deadline = time.monotonic() + 5
        while hub_module.hub.reconnects == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub_module.hub.reconnects == before + 1


def test_a_server_failure_closes_1011_and_frees_the_slot(live_server, inbox, monkeypatch):
    from whistle_web.inbox import services

    def broken(owner: object) -> tuple[int, int]:
        raise RuntimeError("database went away")

    monkeypatch.setattr(services, "inbox_state", broken)
    token = token_for(inbox["org"].id, "u-1")
    with socket(live_server) as ws:
        ws.send({"type": "auth", "token": token})
        assert ws.close_code()[0] == 1011
    monkeypatch.undo()
    with socket(live_server) as ws:
        assert ws.auth(token)["recipient"] == "u-1"


def test_idle_sockets_hold_no_database_connection(live_server, inbox, app):
    from contextlib import ExitStack

    from whistle_web.extensions import db

    token = token_for(inbox["org"].id, "u-1")
    db.session.remove()
    baseline = db.engine.pool.checkedout()
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket(live_server)) for _ in range(5)]
        for ws in sockets:
            ws.auth(token)
        sockets[0].send({"type": "read_all", "ref": 1})
        sockets[0].expect("ack")
        time.sleep(0.2)
        assert db.engine.pool.checkedout() == baseline


def test_one_subscription_serves_every_socket_of_the_process(live_server, inbox, redis):
    from contextlib import ExitStack

    org = inbox["org"]
    with ExitStack() as stack:
        for external_id in ("u-1", "u-1", "u-2"):
            stack.enter_context(socket(live_server)).auth(token_for(org.id, external_id))
        ours = [
            c
            for c in redis.client_list(_type="pubsub")
            if c.get("name") == hub_module.client_name()
        ]
        assert len(ours) == 1 and ours[0]["psub"] == "1"
