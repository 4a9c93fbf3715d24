"""Compose a campaign in Chromium, check it, launch it, and watch it complete."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.factories import PASSWORD
from tests.pipeline.conftest import CONTENT, run_jobs
from whistle_web.accounts.models import Role
from whistle_web.extensions import db


def test_compose_check_launch_and_watch_it_complete(
    app, live_server, page, redis, make_org, make_user, make_template, make_recipient
):
    org = make_org("Campaign Co")
    user = make_user("editor@example.com", org=org, role=Role.EDITOR)
    make_template(org, "welcome", CONTENT)
    for i in range(3):
        make_recipient(org, f"reader-{i}", name=f"Reader {i}")
    make_recipient(org, "not-chosen", name="Someone else")
    db.session.commit()

    page.goto(f"{live_server}/login")
    page.fill("input[name=email]", user.email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")

    page.get_by_role("link", name="Campaigns").click()
    expect(page.locator(".empty")).to_contain_text("No campaigns yet")
    page.get_by_role("link", name="New campaign").first.click()

    # Choosing the template swaps in its channels (htmx).
    page.wait_for_function("() => typeof htmx === 'object'")
    page.fill("input[name=name]", "Welcome readers")
    page.select_option("select[name=template]", "welcome")
    in_app = page.locator("#channels-field input[value=in_app]")
    expect(in_app).to_be_visible(timeout=15_000)  # the machine is shared: allow slow swaps
    for channel in ("email", "sms", "push"):
        page.locator(f"#channels-field input[value={channel}]").uncheck()
    in_app.check()

    # Only the chosen audience's and timing's fields show.
    ids = page.locator("textarea[name=external_ids]")
    expect(ids).to_be_hidden()
    page.get_by_label("Pasted external ids").check()
    expect(ids).to_be_visible()
    ids.fill("reader-0\nreader-1, reader-2")

    page.get_by_label("Recurring (cron)").check()
    page.fill("input[name=cron]", "0 9 * * MON")
    expect(page.locator("#cron-preview li")).to_have_count(5)
    page.get_by_label("Now, at launch").check()
    expect(page.locator("input[name=cron]")).to_be_hidden()
    page.fill("textarea[name=payload]", '{"reason": "welcome aboard"}')
    page.get_by_role("button", name="Save draft").click()

    page.wait_for_url(re.compile(r"/campaigns/\d+$"))
    expect(page.locator("#campaign-status")).to_have_text("draft")
    page.get_by_role("link", name="Check and launch").click()

    # The check: three recipients, each message rendered for them, no rate limit.
    expect(page.locator("#audience-total")).to_have_text("3")
    expect(page.locator(".sample")).to_have_count(3)
    expect(page.locator(".sample").first).to_contain_text("Hello Reader 0")
    expect(page.locator(".sample").first).to_contain_text("welcome aboard")
    expect(page.locator("#estimate")).to_contain_text("no provider rate limit")
    page.get_by_role("button", name="Launch now").click()

    page.wait_for_url(re.compile(r"/campaigns/\d+$"))
    expect(page.locator("#campaign-status")).to_have_text("sending")
    live = page.locator("#campaign-live")
    expect(live).to_have_attribute("hx-trigger", "every 2s")

    # Pause and resume swap the live panel in place (htmx posts with the CSRF header).
    page.get_by_role("button", name="Pause").click()
    expect(page.locator("#campaign-status")).to_have_text("paused")
    expect(live).to_contain_text("Campaign paused.")
    assert live.get_attribute("hx-trigger") is None
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#campaign-status")).to_have_text("sending")
    expect(live).to_have_attribute("hx-trigger", "every 2s")

    # A worker sends it; the page notices by itself.
    db.session.remove()
    run_jobs(redis)
    expect(page.locator("#campaign-status")).to_have_text("completed", timeout=10_000)
    expect(live).to_contain_text("3 of 3 sent")
    # Done: the fragment no longer polls.
    assert live.get_attribute("hx-trigger") is None

    page.get_by_role("navigation", name="Sections").get_by_role("link", name="Campaigns").click()
    row = page.locator("table.campaigns tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("completed")
    expect(row).to_contain_text("3 / 3")
