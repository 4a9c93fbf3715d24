"""Sign in to the console in Chromium with the demo login."""

from __future__ import annotations

from whistle_web.demo import DEMO_EMAIL, DEMO_PASSWORD, seed_demo
from whistle_web.extensions import db


def test_demo_login_reaches_the_dashboard(app, live_server, page):
    seed_demo()
    db.session.commit()

    page.goto(f"{live_server}/")
    assert page.url.startswith(f"{live_server}/login")  # sent to sign in first
    page.fill("input[name=email]", DEMO_EMAIL)
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    assert page.locator("[role=alert]").inner_text() == "Email or password is incorrect."

    page.fill("input[name=password]", DEMO_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")
    assert page.locator("h1").inner_text() == "Acme Cloud (demo)"
    assert page.get_by_role("link", name="Dashboard").get_attribute("aria-current") == "page"
    assert page.locator("table.data").first.is_visible()
    # htmx is served from the npm-installed copy under the strict CSP.
    assert page.evaluate("typeof htmx") == "object"

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{live_server}/login")
    assert "You are signed out." in page.content()
