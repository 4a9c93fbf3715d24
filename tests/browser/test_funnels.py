"""Open a finished campaign's funnel from the campaign list: chart, numbers, links, CSV."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.console.test_funnels import CONTENT, ledger, make_campaign, seed
from tests.factories import PASSWORD
from whistle_web.accounts.models import Role
from whistle_web.campaigns.models import CampaignStatus
from whistle_web.extensions import db
from whistle_web.tenancy import organization_scope


def test_open_a_finished_campaigns_funnel(
    app, live_server, page, make_org, make_user, make_template, make_recipient, make_send_request
):
    org = make_org("Funnel Co")
    user = make_user("viewer@example.com", org=org, role=Role.VIEWER)
    template = make_template(org, "digest", CONTENT)
    campaign = make_campaign(org, "Spring sale")
    seed(org, campaign, make_recipient, make_send_request, template)
    with organization_scope(org.id):
        campaign.status = CampaignStatus.COMPLETED
    db.session.commit()
    expected = ledger(org, campaign.id)

    page.goto(f"{live_server}/login")
    page.fill("input[name=email]", user.email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")

    page.get_by_role("link", name="Campaigns").click()
    page.get_by_role("link", name="Spring sale").first.click()
    page.get_by_role("link", name="Full funnel, chart and CSV →").click()
    page.wait_for_url(f"{live_server}/campaigns/{campaign.id}/funnel")

    expect(page.get_by_role("heading", name="Funnel: Spring sale")).to_be_visible()
    bars = page.get_by_role("img", name="Funnel of Spring sale")
    expect(bars).to_be_visible()
    expect(page.locator("svg.funnel-series polyline")).to_have_count(4)
    steps = page.locator("table.funnel-steps")
    expect(steps.locator("tr.step-targeted td").first).to_have_text(f"{expected['targeted']:,}")
    expect(steps.locator("tr.step-clicked td").first).to_have_text(f"{expected['clicked']:,}")
    # top clicked links arrive by htmx after the page
    expect(page.locator("#top-links table.top-links")).to_contain_text(
        "https://acme.test/a", timeout=15_000
    )
    # one channel, swapped in place
    page.locator(".channel-tabs").get_by_role("link", name="in-app").click()
    expect(page.locator("table.funnel-steps caption")).to_have_text("Funnel (in-app)")
    expect(page).to_have_url(f"{live_server}/campaigns/{campaign.id}/funnel?channel=in_app")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    assert download.value.suggested_filename == f"campaign-{campaign.id}-funnel.csv"
