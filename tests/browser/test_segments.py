"""Build a segment in Chromium and watch the count follow the rules as they change."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.factories import PASSWORD
from whistle_web.accounts.models import Role
from whistle_web.extensions import db


def test_build_a_segment_and_watch_the_count(  # type: ignore[no-untyped-def]
    app, live_server, page, org, make_user, make_recipient
):
    editor = make_user(org=org, role=Role.EDITOR)
    plans = {"ada": "pro", "bob": "free", "cy": "pro", "di": "team", "eve": None}
    for key, plan in plans.items():
        make_recipient(
            org,
            key,
            email=None if key == "eve" else f"{key}@example.com",
            attributes={"plan": plan, "seats": len(key)} if plan else {},
        )
    db.session.commit()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(f"{live_server}/login")
    page.fill("input[name=email]", editor.email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.get_by_role("link", name="Segments").click()
    expect(page.locator(".empty")).to_contain_text("No segments yet")
    page.get_by_role("link", name="New segment").click()

    count = page.locator("#segment-count")
    expect(count).to_have_text("5")  # no conditions: everyone

    # A new condition starts as "email is set": eve has none.
    page.get_by_role("button", name="+ Condition").click()
    expect(page.locator("#r-0-kind")).to_be_focused()
    expect(count).to_have_text("4")

    # Look at an attribute instead; the builder comes back with the attribute's controls.
    page.select_option("#r-0-kind", "attribute")
    expect(page.locator("#r-0-key")).to_be_visible()
    page.fill("#r-0-key", "plan")
    page.select_option("#r-0-operator", "eq")
    page.locator("#r-0-value").press_sequentially("pro", delay=30)
    expect(count).to_have_text("2")
    expect(page.locator(".segment-preview table.sample")).to_contain_text("ada@example.com")

    # A nested group with a number condition: a typo is named beside the condition.
    page.get_by_role("button", name="+ Group").click()
    expect(page.locator("#r-1-op")).to_be_focused()  # the new group's first control
    expect(count).to_have_text("2")  # plan = pro and (email is set)
    page.select_option("#r-1-0-kind", "attribute")
    page.fill("#r-1-0-key", "seats")
    page.select_option("#r-1-0-type", "number")
    page.select_option("#r-1-0-operator", "gt")
    page.locator("#r-1-0-value").press_sequentially("lots", delay=20)
    expect(page.locator("#err-r-1-0")).to_have_text("Expected a number.")
    expect(count).to_have_text("—")
    page.fill("#r-1-0-value", "2")
    expect(page.locator("#err-r-1-0")).to_have_text("")
    expect(count).to_have_text("1")  # ada: pro with 3 seats
    page.select_option("#r-op", "or")
    expect(count).to_have_text("3")  # ada and cy (pro) or bob (3 seats)

    page.fill("#segment-name", "Pro or big")
    page.click("#segment-save")
    expect(page.locator("h1")).to_have_text("Pro or big")
    expect(page.locator("#segment-count")).to_have_text("3")
    expect(page.locator(".rule-summary")).to_contain_text("plan is pro or seats > 2")

    page.get_by_role("navigation", name="Sections").get_by_role("link", name="Segments").click()
    row = page.locator("table.segments-list tbody tr")
    expect(row).to_have_count(1)
    expect(row.locator("td.num")).to_have_text("3")  # counted lazily by htmx
    assert errors == []
