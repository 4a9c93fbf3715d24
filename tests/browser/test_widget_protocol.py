"""The widget against the protocol contract, with /ws and the HTTP feed played by the test.

The widget script is the real static file from the live server; the host page, the socket
and the feed are answered by Playwright, so every branch of the contract can be driven:
resume with ``last_seq``, ``reset``, an expired token, and the HTTP fallback.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

from playwright.sync_api import Route, WebSocketRoute, expect

WIDGET = "whistle-inbox"
PREFERENCES = "https://whistle.example/p/signed-token"


def fake_token(name: str) -> str:
    """A JWT-shaped token the widget can read ``exp`` from (the fake server checks nothing)."""
    claims = {"sub": name, "exp": int(time.time()) + 3600}
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{body}.signature"


def item(item_id: int, seq: int, title: str, **fields: Any) -> dict[str, Any]:
    """A notification frame (the feed serves the same shape without ``type``)."""
    return {
        "type": "notification",
        "seq": seq,
        "id": item_id,
        "notification_id": item_id + 1000,
        "title": title,
        "body": fields.pop("body", f"Body of {title}"),
        "action_url": fields.pop("action_url", None),
        "data": {},
        "created_at": fields.pop("created_at", f"2026-11-24T06:{item_id:02d}:00+00:00"),
        "seen_at": None,
        "read_at": None,
        "archived_at": None,
        "clicked_at": None,
        **fields,
    }


class FakeWhistle:
    """Plays /ws and /api/v1/inbox for one page and records what the widget sent."""

    def __init__(self, page, base: str, *, feed: list[dict[str, Any]], sockets: bool = True):  # type: ignore[no-untyped-def]
        self.base = base
        self.feed = feed
        self.accept_sockets = sockets
        self.sockets: list[WebSocketRoute] = []
        self.frames: list[list[dict[str, Any]]] = []  # per socket, client frames
        self.http: list[tuple[str, str, Any]] = []
        self.seq = max([i["seq"] for i in feed], default=0)
        page.route_web_socket(re.compile(r".*/ws$"), self._socket)
        page.route(f"{base}/api/v1/inbox**", self._inbox)

    def unread(self) -> int:
        return sum(1 for i in self.feed if not i["read_at"] and not i["archived_at"])

    def _socket(self, ws: WebSocketRoute) -> None:
        self.sockets.append(ws)
        frames: list[dict[str, Any]] = []
        self.frames.append(frames)
        if not self.accept_sockets:
            ws.close(code=1011, reason="unavailable")
            return

        def on_message(message: str | bytes) -> None:
            frame = json.loads(message)
            frames.append(frame)
            if frame["type"] == "auth":
                self.on_auth(ws, frame)
            elif frame["type"] != "pong":
                ws.send(json.dumps({"type": "ack", "ref": frame.get("ref")}))

        ws.on_message(on_message)

    def on_auth(self, ws: WebSocketRoute, frame: dict[str, Any]) -> None:
        ws.send(
            json.dumps(
                {
                    "type": "ready",
                    "seq": self.seq,
                    "unread_count": self.unread(),
                    "recipient": "ada",
                    "preferences_url": PREFERENCES,
                }
            )
        )

    def push(self, frame: dict[str, Any], socket: int = -1) -> None:
        """Send a frame; a notification also becomes (or replaces) the feed's item."""
        if frame["type"] == "notification":
            self.feed = [i for i in self.feed if i["id"] != frame["id"]] + [frame]
            self.seq = max(self.seq, frame["seq"])
        self.sockets[socket].send(json.dumps(frame))

    def _inbox(self, route: Route) -> None:
        request = route.request
        path = request.url.removeprefix(self.base)
        body = request.post_data_json if request.method == "POST" else None
        self.http.append((request.method, path.split("?")[0], body))
        if request.method == "GET" and path.startswith("/api/v1/inbox/unread-count"):
            route.fulfill(json={"count": self.unread()})
        elif request.method == "GET":
            items = [
                {k: v for k, v in i.items() if k != "type"}
                for i in sorted(self.feed, key=lambda i: i["created_at"], reverse=True)
                if not i["archived_at"]
            ]
            route.fulfill(
                json={
                    "items": items,
                    "next_cursor": None,
                    "unread_count": self.unread(),
                    "seq": self.seq,
                    "preferences_url": PREFERENCES,
                }
            )
        else:
            match = re.match(r"/api/v1/inbox/(\d+)/(read|archive|clicked)$", path)
            if match:
                target = next(i for i in self.feed if i["id"] == int(match.group(1)))
                field = {"read": "read_at", "archive": "archived_at", "clicked": "clicked_at"}
                target[field[match.group(2)]] = "2026-11-24T07:00:00+00:00"
            route.fulfill(status=204)


def host_page(page, live_server: str, body: str) -> None:  # type: ignore[no-untyped-def]
    """Serve a customer's page (with hostile global styles) at the live server's origin."""
    html = f"""<!doctype html><html lang="en"><head><title>Customer app</title>
    <style>button {{ background: rgb(255, 0, 0); text-transform: uppercase; }}
    .badge {{ color: rgb(0, 128, 0); }} li {{ list-style: square; }}</style></head>
    <body><h1>Customer app</h1><span class="badge">host badge</span><div id="bell"></div>
    {body}</body></html>"""
    page.route(
        f"{live_server}/customer",
        lambda route: route.fulfill(body=html, content_type="text/html"),
    )
    page.goto(f"{live_server}/customer")


def test_one_script_tag_live_updates_resume_and_safety(live_server, page):
    hostile = '<img src=x onerror="window.__pwned = 1">'
    fake = FakeWhistle(
        page,
        live_server,
        feed=[
            item(1, 5, hostile, action_url="javascript:window.__pwned=1"),
            item(2, 7, "Read already", read_at="2026-11-24T06:10:00+00:00"),
        ],
    )
    token = fake_token("ada")
    host_page(
        page,
        live_server,
        f'<script src="{live_server}/static/widget/whistle.js" data-token="{token}" '
        'data-target="#bell" async></script>',
    )
    bell = page.locator(f"{WIDGET} button.bell")
    badge = page.locator(f"{WIDGET} .badge")
    expect(badge).to_have_text("1")
    expect(page.locator(f"{WIDGET} li.item")).to_have_count(2)  # the feed is in
    assert fake.frames[0][0] == {"type": "auth", "token": token}  # no last_seq at first
    assert ("GET", "/api/v1/inbox", None) in fake.http  # the first page came from the feed

    # A live notification: counted, announced, listed first; no reload.
    fake.push(item(3, 11, "Deploy finished", action_url="https://app.example/deploys/3"))
    expect(badge).to_have_text("2")
    expect(page.locator(f"{WIDGET} [aria-live=polite]")).to_have_text(
        "New notification: Deploy finished"
    )

    # Keyboard: the bell opens the panel and takes focus into it; arrows move between items.
    bell.focus()
    page.keyboard.press("Enter")
    expect(bell).to_have_attribute("aria-expanded", "true")
    titles = page.locator(f"{WIDGET} .item-main")
    expect(titles).to_have_count(3)
    expect(titles.nth(0)).to_have_text("Unread: Deploy finished")
    page.keyboard.press("ArrowDown")
    expect(titles.nth(0)).to_be_focused()
    page.keyboard.press("ArrowDown")
    expect(titles.nth(1)).to_be_focused()
    # Opening marked what it showed as seen, in one frame.
    seen = [f for f in fake.frames[0] if f["type"] == "seen"]
    assert len(seen) == 1 and sorted(seen[0]["ids"]) == [1, 2, 3]

    # Untrusted text stays text; a javascript: action never becomes a link.
    hostile_title = titles.nth(2)
    expect(hostile_title).to_have_text(f"Unread: {hostile}")
    assert hostile_title.evaluate("e => e.tagName") == "BUTTON"
    assert page.locator(f"{WIDGET} img").count() == 0
    assert page.evaluate("window.__pwned") is None
    expect(titles.nth(0)).to_have_attribute("href", "https://app.example/deploys/3")
    expect(page.locator(f"{WIDGET} a.prefs")).to_have_attribute("href", PREFERENCES)

    # Reading the hostile item by click: a read frame, badge down.
    hostile_title.click()
    expect(badge).to_have_text("1")
    assert {"type": "read", "id": 1} in [
        {k: v for k, v in f.items() if k != "ref"} for f in fake.frames[0]
    ]

    # Another tab read item 3: the updated frame and the new count arrive.
    fake.push({"type": "updated", "seq": 12, "id": 3, "read_at": "2026-11-24T07:00:00+00:00"})
    fake.push({"type": "unread_count", "count": 0})
    expect(badge).to_be_hidden()
    expect(titles.nth(0)).to_have_text("Deploy finished")

    # The server goes away: the widget comes back on its own and resumes from seq 12.
    fake.sockets[0].close(code=1012, reason="restart")
    expect(page.locator(f"{WIDGET} .status")).to_have_text("Reconnecting\u2026")
    page.wait_for_function("() => window.Whistle.instances[0].live", timeout=10000)
    assert fake.frames[1][0]["last_seq"] == 12
    fake.push(item(4, 13, "Missed while away"))
    fake.push(item(3, 14, "Deploy finished", archived_at="2026-11-24T07:01:00+00:00"))
    fake.push({"type": "unread_count", "count": 1})
    expect(titles).to_have_count(3)
    expect(titles.nth(0)).to_have_text("Unread: Missed while away")
    expect(badge).to_have_text("1")
    expect(page.locator(f"{WIDGET} .status")).to_be_hidden()
    # Replayed frames are not news: nothing new was announced.
    expect(page.locator(f"{WIDGET} [aria-live=polite]")).not_to_have_text(
        re.compile("Missed while away")
    )

    # Too much missed: reset means the feed is read again over HTTP.
    fake.feed.append(item(5, 20, "From the feed after reset"))
    fake.seq = 20
    before = len([r for r in fake.http if r[0] == "GET"])
    fake.push({"type": "reset"})
    expect(page.locator(f"{WIDGET} li.item", has_text="From the feed after reset")).to_have_count(1)
    assert len([r for r in fake.http if r[0] == "GET"]) == before + 1

    # Escape closes the panel and gives focus back to the bell.
    page.keyboard.press("Escape")
    expect(bell).to_have_attribute("aria-expanded", "false")
    expect(bell).to_be_focused()

    # Page styles do not reach in; widget styles do not leak out.
    assert bell.evaluate("e => getComputedStyle(e).backgroundColor") != "rgb(255, 0, 0)"
    assert bell.evaluate("e => getComputedStyle(e).textTransform") == "none"
    host_badge = page.locator("body > span.badge")
    assert host_badge.evaluate("e => getComputedStyle(e).color") == "rgb(0, 128, 0)"
    assert host_badge.evaluate("e => getComputedStyle(e).position") == "static"


def test_an_expired_token_is_renewed_through_the_page(live_server, page):
    fake = FakeWhistle(page, live_server, feed=[item(1, 3, "Hello")])
    renewed = fake_token("ada-renewed")
    page.route(
        f"{live_server}/customer-token",
        lambda route: route.fulfill(body=renewed, content_type="text/plain"),
    )
    first = fake_token("ada")
    host_page(
        page,
        live_server,
        f'<script src="{live_server}/static/widget/whistle.js"></script>'
        "<script>window.renewals = 0; window.inbox = Whistle.init({"
        f'token: "{first}", target: "#bell", onTokenExpired: () => {{ window.renewals += 1; '
        f'return fetch("{live_server}/customer-token").then(r => r.text()); }}}});</script>',
    )
    expect(page.locator(f"{WIDGET} .badge")).to_have_text("1")
    fake.sockets[0].close(code=4001, reason="The recipient token expired.")
    page.wait_for_function("() => window.renewals === 1 && window.inbox.live", timeout=10000)
    assert fake.frames[1][0]["token"] == renewed
    assert fake.frames[1][0]["last_seq"] == 3


def test_without_a_socket_the_widget_uses_the_http_feed(live_server, page):
    fake = FakeWhistle(
        page,
        live_server,
        feed=[item(1, 3, "Welcome", action_url="https://app.example/start"), item(2, 4, "Tip")],
        sockets=False,
    )
    page.context.route(
        "https://app.example/**", lambda route: route.fulfill(body="ok", content_type="text/plain")
    )
    host_page(
        page,
        live_server,
        f'<script src="{live_server}/static/widget/whistle.js" data-token="{fake_token("ada")}" '
        'data-target="#bell" async></script>',
    )
    badge = page.locator(f"{WIDGET} .badge")
    # Two failed socket attempts (with backoff), then the feed is polled over HTTP.
    expect(badge).to_have_text("2", timeout=10000)
    assert len(fake.sockets) >= 2
    page.locator(f"{WIDGET} button.bell").click()
    expect(page.locator(f"{WIDGET} .status")).to_have_text("Reconnecting\u2026")

    with page.expect_popup() as popup:
        page.locator(f"{WIDGET} a.item-main").click()
    popup.value.close()
    expect(badge).to_have_text("1")
    posts = [(path, body) for method, path, body in fake.http if method == "POST"]
    assert ("/api/v1/inbox/seen", {"ids": [2, 1]}) in posts or (
        "/api/v1/inbox/seen",
        {"ids": [1, 2]},
    ) in posts
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and ("/api/v1/inbox/1/clicked", {}) not in posts:
        page.wait_for_timeout(100)
        posts = [(path, body) for method, path, body in fake.http if method == "POST"]
    assert ("/api/v1/inbox/1/read", {}) in posts and ("/api/v1/inbox/1/clicked", {}) in posts

    page.get_by_role("button", name="Archive: Tip").click()
    expect(page.locator(f"{WIDGET} li.item")).to_have_count(1)
    page.wait_for_timeout(200)
    assert ("POST", "/api/v1/inbox/2/archive", {}) in fake.http
    assert fake.feed[1]["archived_at"] is not None
