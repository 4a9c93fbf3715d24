"""The in-app widget on the demo page in Chromium: live arrival over /ws, read and clicked."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import expect
from sqlalchemy import func, select, text

from tests.pipeline.conftest import run_jobs
from whistle_web.accounts.services import create_api_key
from whistle_web.deliveries.models import Delivery
from whistle_web.demo import DEMO_EMAIL, DEMO_PASSWORD, DEMO_SLUG, seed_demo
from whistle_web.errors import Actor
from whistle_web.extensions import db
from whistle_web.models import Organization, Recipient, Template, TemplateVersion, VersionState
from whistle_web.tenancy import organization_scope, unscoped
from whistle_web.tracking import links

RECIPIENT = "user_0001"
WIDGET = "whistle-inbox"  # Playwright's CSS engine pierces the widget's open shadow root


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns something truthy (the live server commits on its own)."""
    deadline = time.monotonic() + timeout
    while True:
        db.session.expire_all()
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.fixture
def demo(app, live_server):  # type: ignore[no-untyped-def]
    """The demo organization, allowed to embed from the live server, with a build template."""
    # Redis pub/sub channels ignore the database number, and inbox channels are named by
    # organization and recipient id: a random organization id keeps other test runs on the
    # same Redis (which start their ids at 1) from talking to this page's socket.
    start = random.randint(10**6, 10**9)
    db.session.execute(text(f"ALTER TABLE organizations ALTER COLUMN id RESTART WITH {start}"))
    seed_demo()
    org = db.session.scalar(unscoped(select(Organization).where(Organization.slug == DEMO_SLUG)))
    org.allowed_origins = [*org.allowed_origins, live_server]
    with organization_scope(org.id):
        template = Template(key="build-finished", name="Build finished")
        db.session.add(template)
        db.session.flush()
        version = TemplateVersion(
            template_id=template.id,
            version=1,
            state=VersionState.PUBLISHED,
            content={
                "in_app": {
                    "title": "Build {{ data.build }} finished",
                    "body": "All {{ data.checks }} checks passed.",
                    "action_url": "https://acme.test/builds/{{ data.build }}",
                }
            },
        )
        db.session.add(version)
        db.session.flush()
        template.published_version_id = version.id
        key = create_api_key("browser test", actor=Actor.system("tests"))
        recipient = db.session.scalar(select(Recipient).where(Recipient.external_id == RECIPIENT))
    db.session.commit()
    return {"org": org, "api_key": key.secret, "recipient_id": recipient.id}


def unread_in_db(org_id: int, recipient_id: int) -> int:
    with organization_scope(org_id):
        return db.session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(
                Delivery.recipient_id == recipient_id,
                Delivery.channel == "in_app",
                Delivery.sent_at.is_not(None),
                Delivery.read_at.is_(None),
                Delivery.archived_at.is_(None),
            )
        )


def build_delivery(org_id: int, recipient_id: int) -> Delivery | None:
    return build_deliveries(org_id, recipient_id).get("42")


def inbox_size(org_id: int, recipient_id: int) -> int:
    with organization_scope(org_id):
        return db.session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(
                Delivery.recipient_id == recipient_id,
                Delivery.channel == "in_app",
                Delivery.sent_at.is_not(None),
                Delivery.archived_at.is_(None),
            )
        )


def build_deliveries(org_id: int, recipient_id: int) -> dict[str, Delivery]:
    """The recipient's build notifications by build number."""
    from whistle_web.models import Notification

    with organization_scope(org_id):
        rows = db.session.execute(
            select(Notification.data, Delivery)
            .join(Delivery, Delivery.notification_id == Notification.id)
            .join(Template, Template.id == Delivery.template_id)
            .where(Template.key == "build-finished", Delivery.recipient_id == recipient_id)
        ).all()
    return {str((data or {}).get("build")): delivery for data, delivery in rows}


def trigger(app, api_key: str, build: str) -> None:  # type: ignore[no-untyped-def]
    response = app.test_client().post(
        "/api/v1/notifications",
        json={
            "template": "build-finished",
            "to": [RECIPIENT],
            "channels": ["in_app"],
            "data": {"build": build, "checks": 7},
        },
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert response.status_code == 202, response.get_json()


def sign_in(page, live_server: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{live_server}/login")
    page.fill("input[name=email]", DEMO_EMAIL)
    page.fill("input[name=password]", DEMO_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")


def test_the_widget_receives_live_and_marks_read(app, live_server, page, demo, redis):
    org_id, recipient_id = demo["org"].id, demo["recipient_id"]
    # The action link opens the customer's site in a new tab: answer it locally.
    page.context.route(
        "https://acme.test/**", lambda route: route.fulfill(body="ok", content_type="text/plain")
    )
    errors: list[str] = []

    def on_demo_page() -> bool:
        return "/widget/demo" in page.url

    page.on("pageerror", lambda error: errors.append(str(error)) if on_demo_page() else None)
    page.on(
        "console",
        lambda message: (
            errors.append(message.text)
            if on_demo_page() and message.type == "error" and "Content Security" in message.text
            else None
        ),
    )
    sign_in(page, live_server)
    page.get_by_role("link", name="Widget demo").click()
    page.wait_for_url(f"{live_server}/widget/demo")
    page.goto(f"{live_server}/widget/demo?recipient={RECIPIENT}")
    page.wait_for_function("() => window.whistleDemo && window.whistleDemo.live", timeout=10000)

    bell = page.locator(f"{WIDGET} button.bell")
    badge = page.locator(f"{WIDGET} .badge")
    before = unread_in_db(org_id, recipient_id)
    expect(bell).to_have_attribute("aria-expanded", "false")
    if before:
        expect(badge).to_have_text(str(before))
    else:
        expect(badge).to_be_hidden()
    # The first page of the inbox came from the HTTP feed; the preference link is signed.
    items = page.locator(f"{WIDGET} li.item")
    expect(items).to_have_count(inbox_size(org_id, recipient_id))
    prefs = page.locator(f"{WIDGET} a.prefs").get_attribute("href")
    token = prefs.rsplit("/p/", 1)[1]
    assert links.verify_preferences(token, secret=app.config["SECRET_KEY"]) == (
        links.LinkPayload("preferences", org_id, recipient_id=recipient_id)
    )
    page.evaluate("window.__sameDocument = true")

    # Trigger through the API, then let a worker deliver it.
    trigger(app, demo["api_key"], "42")
    assert run_jobs(redis) >= 1
    delivery = build_delivery(org_id, recipient_id)
    assert delivery is not None and delivery.sent_at is not None

    # The badge counts it and the item is there, without a reload.
    expect(badge).to_have_text(str(before + 1))
    expect(bell).to_have_attribute("aria-label", f"Notifications, {before + 1} unread")
    assert page.evaluate("window.__sameDocument") is True
    live_region = page.locator(f"{WIDGET} [aria-live=polite]")
    expect(live_region).to_have_text("New notification: Build 42 finished")

    # Open the dropdown: the item is first, unread, and everything shown becomes seen.
    bell.click()
    expect(bell).to_have_attribute("aria-expanded", "true")
    first = page.locator(f"{WIDGET} li.item").first
    expect(first).to_have_class(re.compile(r"\bunread\b"))
    expect(first.locator(".item-main")).to_have_text("Unread: Build 42 finished")
    expect(first.locator(".body")).to_have_text("All 7 checks passed.")
    assert eventually(lambda: build_delivery(org_id, recipient_id).seen_at is not None)

    # Follow the action link: read and clicked, recorded on the delivery.
    with page.expect_popup() as popup:
        first.locator("a.item-main").click()
    assert popup.value.url == "https://acme.test/builds/42"
    popup.value.close()
    assert eventually(lambda: build_delivery(org_id, recipient_id).clicked_at is not None)
    delivery = build_delivery(org_id, recipient_id)
    assert delivery.read_at is not None and delivery.clicked_at is not None
    expect(first).not_to_have_class(re.compile(r"\bunread\b"))
    expect(first.locator(".item-main")).to_have_text("Build 42 finished")
    if before:
        expect(badge).to_have_text(str(before))
    else:
        expect(badge).to_be_hidden()
    assert unread_in_db(org_id, recipient_id) == before

    # Keyboard: Escape closes and gives focus back to the bell.
    page.keyboard.press("Escape")
    expect(bell).to_have_attribute("aria-expanded", "false")
    assert (
        page.evaluate("document.querySelector('whistle-inbox').shadowRoot.activeElement.className")
        == "bell"
    )

    # The connection drops; what is sent meanwhile arrives when it resumes from last_seq.
    page.evaluate(
        """() => {
            window.__sent = [];
            const send = WebSocket.prototype.send;
            WebSocket.prototype.send = function (data) { window.__sent.push(data); return send.call(this, data); };
            window.whistleDemo.stopped = true;  // hold the reconnect until the test says so
            window.whistleDemo.socket.close();
        }"""
    )
    page.wait_for_function("() => !window.whistleDemo.live")
    trigger(app, demo["api_key"], "43")
    assert run_jobs(redis) >= 1
    page.evaluate(
        "() => { window.whistleDemo.stopped = false; window.whistleDemo._reconnectNow(); }"
    )
    page.wait_for_function("() => window.whistleDemo.live")
    auth = page.evaluate("JSON.parse(window.__sent[0])")
    assert auth["type"] == "auth" and isinstance(auth["last_seq"], int) and auth["last_seq"] > 0
    expect(badge).to_have_text(str(before + 1))
    bell.click()
    expect(page.locator(f"{WIDGET} li.item").first.locator(".item-main")).to_have_text(
        "Unread: Build 43 finished"
    )
    assert page.locator(f"{WIDGET} li.item", has_text="Build 43 finished").count() == 1

    # Archive it, then mark everything read.
    page.get_by_role("button", name="Archive: Build 43 finished").click()
    expect(page.locator(f"{WIDGET} li.item", has_text="Build 43 finished")).to_have_count(0)
    assert eventually(lambda: build_deliveries(org_id, recipient_id)["43"].archived_at)
    page.get_by_role("button", name="Mark all read").click()
    expect(badge).to_be_hidden()
    assert eventually(lambda: unread_in_db(org_id, recipient_id) == 0)
    expect(bell).to_have_attribute("aria-label", "Notifications")
    page.keyboard.press("Escape")

    # Styles stay on their own side of the shadow root.
    page_badge = page.locator(".host-cards .badge").first
    assert page_badge.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(47, 158, 68)"
    assert bell.evaluate("e => getComputedStyle(e).backgroundColor") != "rgb(255, 212, 59)"
    assert bell.evaluate("e => getComputedStyle(e).textTransform") == "none"
    assert errors == [], errors


def test_without_a_socket_the_widget_works_over_the_http_feed(app, live_server, page, demo, redis):
    """The socket is refused (a proxy that drops WebSockets): the real feed API serves."""
    org_id, recipient_id = demo["org"].id, demo["recipient_id"]
    page.route_web_socket(re.compile(r".*/ws$"), lambda ws: ws.close(code=1011, reason="no"))
    page.context.route(
        "https://acme.test/**", lambda route: route.fulfill(body="ok", content_type="text/plain")
    )
    trigger(app, demo["api_key"], "7")
    assert run_jobs(redis) >= 1
    before = unread_in_db(org_id, recipient_id)
    assert before >= 1

    sign_in(page, live_server)
    page.goto(f"{live_server}/widget/demo?recipient={RECIPIENT}")
    badge = page.locator(f"{WIDGET} .badge")
    expect(badge).to_have_text(str(before), timeout=10000)
    assert page.evaluate("window.whistleDemo.live") is False
    page.locator(f"{WIDGET} button.bell").click()
    item = page.locator(f"{WIDGET} li.item", has_text="Build 7 finished")
    expect(item).to_have_count(1)
    with page.expect_popup():
        item.locator(".item-main").click()  # the action link: a new tab, and the click recorded
    assert eventually(lambda: build_deliveries(org_id, recipient_id)["7"].clicked_at)
    delivery = build_deliveries(org_id, recipient_id)["7"]
    assert delivery.read_at is not None and delivery.seen_at is not None
    if before > 1:
        expect(badge).to_have_text(str(before - 1))
    else:
        expect(badge).to_be_hidden()
