"""Settings in Chromium: add an SMTP provider and send a test through it; create an API
key, copy its secret once, revoke it and see the API refuse it at once."""

from __future__ import annotations

import httpx
import pytest

from tests.factories import PASSWORD, SYSTEM
from tests.smtp_sink import SmtpSink
from whistle_web.accounts.models import Role
from whistle_web.accounts.services import add_member, create_user
from whistle_web.extensions import db
from whistle_web.organizations.services import create_organization
from whistle_web.tenancy import organization_scope

SMTP_PASSWORD = "browser-smtp-password-never-shown"


@pytest.fixture
def admin(app):  # type: ignore[no-untyped-def]
    org = create_organization("Browser Co")
    user = create_user("admin@browser.io", PASSWORD)
    with organization_scope(org.id):
        add_member(user, Role.ADMIN, actor=SYSTEM)
    db.session.commit()
    return user


def sign_in(page, live_server):  # type: ignore[no-untyped-def]
    page.goto(f"{live_server}/login")
    page.fill("input[name=email]", "admin@browser.io")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")


def test_add_an_smtp_provider_and_send_a_test(admin, live_server, page):
    with SmtpSink() as sink:
        sign_in(page, live_server)
        page.get_by_role("link", name="Settings").click()
        page.get_by_role("link", name="Providers").first.click()
        page.get_by_role("link", name="Add a provider").click()
        # Choosing the kind swaps in its fields (htmx, loaded deferred: once the page has
        # loaded, it listens; a change before that went unheard and flaked in CI).
        page.wait_for_load_state("load")
        page.select_option("#kind", "smtp")
        page.wait_for_selector("input[name='config.host']")
        page.fill("#name", "Sink")
        page.fill("input[name='config.host']", "127.0.0.1")
        page.fill("input[name='config.port']", str(sink.port))
        page.select_option("select[name='config.use_tls']", "none")
        page.fill("input[name='config.from_email']", "hello@browser.io")
        page.check("input[name=enabled]")
        page.get_by_role("button", name="Add provider").click()
        page.wait_for_selector("text=Provider Sink added.")
        assert "Send a test" in page.content()

        page.fill("#test-to", "someone@browser.io")
        page.get_by_role("button", name="Send test").click()
        page.wait_for_selector("#test-result .ok")
        assert "Sent." in page.locator("#test-result").inner_text()
        (message,) = sink.messages
        assert message["To"] == "someone@browser.io"

        # A password typed later is stored but never shown back.
        page.fill("input[name='config.username']", "mailer")
        page.fill("input[name='config.password']", SMTP_PASSWORD)
        page.get_by_role("button", name="Save changes").click()
        page.wait_for_selector("text=Provider Sink saved.")
        assert SMTP_PASSWORD not in page.content()
        assert page.locator("label[for='f-password'] .badge-set").is_visible()

        page.goto(f"{live_server}/settings/providers")
        row = page.locator("#channel-email tr.provider-row")
        assert row.count() == 1 and "enabled" in row.inner_text()
        row.get_by_role("button", name="Disable").click()
        page.wait_for_selector("#channel-email .badge-disabled")


def test_create_and_revoke_an_api_key(admin, live_server, page):
    sign_in(page, live_server)
    page.goto(f"{live_server}/settings/api-keys")
    page.fill("#key-name", "Browser backend")
    page.check("input[value='providers:read']")
    page.get_by_role("button", name="Create key").click()
    page.wait_for_selector("#new-secret")
    secret = page.input_value("#new-secret")
    assert secret.startswith("whk_")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server)
    page.get_by_role("button", name="Copy").click()
    page.wait_for_selector("button.copy:has-text('Copied')")

    api = f"{live_server}/api/v1/providers"
    headers = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(api, headers=headers).status_code == 200

    page.get_by_role("link", name="Back to API keys").click()
    assert secret not in page.content()  # shown once, never again
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Revoke").click()
    page.wait_for_selector("text=revoked")
    assert httpx.get(api, headers=headers).status_code == 401


def test_the_last_owner_sees_why_they_cannot_step_down(app, live_server, page):
    org = create_organization("Owner Co")
    owner = create_user("owner@browser.io", PASSWORD)
    with organization_scope(org.id):
        add_member(owner, Role.OWNER, actor=SYSTEM)
    db.session.commit()
    page.goto(f"{live_server}/login")
    page.fill("input[name=email]", "owner@browser.io")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")
    page.goto(f"{live_server}/settings/team")
    page.select_option(f"#role-{owner.id}", "admin")
    page.get_by_role("button", name="Change").click()
    # The refusal (409) is swapped in place by htmx, next to the role.
    page.wait_for_selector("text=The last owner cannot be demoted")
    assert page.url == f"{live_server}/settings/team"
