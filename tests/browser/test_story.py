"""The recipient's story in Chromium: find a recipient by email, read the history of a
campaign email, open the message as sent (sandboxed frame), and ask "why not" for a campaign."""

from __future__ import annotations

from datetime import UTC, datetime

from playwright.sync_api import expect

from tests.factories import PASSWORD, SYSTEM
from tests.pipeline.conftest import CONTENT, run_jobs
from tests.pipeline.test_email import smtp_provider
from tests.smtp_sink import SmtpSink
from whistle_web.accounts.models import Role
from whistle_web.campaigns.services import create_campaign, launch_campaign
from whistle_web.extensions import db
from whistle_web.tenancy import organization_scope


def test_search_a_recipient_and_open_a_message_as_sent(
    app, live_server, page, redis, make_org, make_user, make_template, make_recipient
):
    org = make_org("Acme Story")
    make_user("support@example.com", org=org, role=Role.EDITOR)
    make_template(org, "digest", CONTENT)
    ada = make_recipient(org, "u-ada", email="ada@example.com", name="Ada")
    gone = make_recipient(
        org, "u-gone", email="gone@example.com", unsubscribed_at=datetime.now(UTC)
    )
    with SmtpSink() as sink:
        smtp_provider(org, sink.port, name="Postfix")
        with organization_scope(org.id):
            campaign = create_campaign(
                "November digest",
                template_key="digest",
                channels=["email"],
                audience_type="all",
                actor=SYSTEM,
            )
        db.session.commit()
        with organization_scope(org.id):
            launch_campaign(campaign.id, actor=SYSTEM)
        db.session.commit()
        run_jobs(redis)
    db.session.commit()

    page.goto(f"{live_server}/recipients/story")
    page.fill("input[name=email]", "support@example.com")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/recipients/story")
    page.get_by_label("Email, phone or external id").fill("ada@example.com")
    page.get_by_role("button", name="Find").click()
    page.wait_for_url(f"{live_server}/recipients/{ada.id}/history")
    nav = page.get_by_role("navigation", name="Sections")
    assert nav.get_by_role("link", name="Recipients").get_attribute("aria-current") == "page"
    entry = page.locator(".story-entry").first
    expect(entry).to_contain_text("November digest")
    expect(entry).to_contain_text("Postfix")
    expect(entry.locator(".steps")).to_contain_text("sent")

    entry.get_by_text("Message as sent").click()
    expect(entry).to_contain_text("Hello Ada")
    frame = page.frame_locator("iframe.story-frame")
    expect(frame.locator("a")).to_have_text("this")

    # "Why not" for the unsubscribed recipient, from their History tab.
    page.goto(f"{live_server}/recipients/{gone.id}/history")
    page.get_by_role("link", name="Why not?").click()
    page.get_by_label("Campaign", exact=True).select_option(str(campaign.id))
    page.get_by_role("button", name="Explain").click()
    expect(page.locator("#why-now")).to_contain_text("Email: not sent — the recipient unsubscribed")
    expect(page.locator("#why-ledger")).to_contain_text("Email: not sent")
