"""Recipients in Chromium: sign in, search as you type, edit a preference, switch topics."""

from __future__ import annotations

from playwright.sync_api import expect
from sqlalchemy import select

from tests.factories import PASSWORD
from whistle_web.accounts.models import Role
from whistle_web.audiences.models import Topic
from whistle_web.extensions import db
from whistle_web.models import AuditLog, Category, Preference
from whistle_web.tenancy import organization_scope


def test_search_a_recipient_and_edit_a_preference(
    app, live_server, page, make_org, make_user, make_recipient
):
    org = make_org("Acme Cloud")
    make_user("support@example.com", org=org, role=Role.EDITOR)
    with organization_scope(org.id):
        db.session.add_all(
            [
                Category(key="marketing", name="Marketing"),
                Category(key="security", name="Security alerts", critical=True),
                Topic(key="launches", name="Product launches"),
            ]
        )
    ada = make_recipient(
        org, "u-ada", email="ada@example.com", name="Ada Lovelace", attributes={"plan": "pro"}
    )
    for i in range(5):
        make_recipient(org, f"u-{i}", email=f"person{i}@example.com", attributes={"plan": "free"})
    db.session.commit()

    page.goto(f"{live_server}/recipients")
    page.wait_for_url(f"{live_server}/login?next=%2Frecipients")
    page.fill("input[name=email]", "support@example.com")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/recipients")
    assert page.get_by_role("link", name="Recipients").get_attribute("aria-current") == "page"
    rows = page.locator("#recipient-rows > tr")
    assert rows.count() == 6

    # Search as you type: the table narrows without a page load.
    page.locator("body").evaluate("b => b.dataset.marker = 'same page'")
    page.get_by_label("Search").press_sequentially("plan=pro", delay=30)
    expect(rows).to_have_count(1)
    assert rows.first.locator("a").inner_text() == "u-ada"
    assert page.locator("body").get_attribute("data-marker") == "same page"
    assert page.url.endswith("/recipients?q=plan%3Dpro")
    page.get_by_label("Search").fill("nobody-here")
    page.wait_for_selector("text=No recipient matches")
    page.get_by_label("Search").fill("lovelace")
    page.wait_for_selector("#recipient-rows >> text=u-ada")

    page.get_by_role("link", name="u-ada").click()
    page.wait_for_url(f"{live_server}/recipients/{ada.id}")
    assert page.locator("h1").inner_text() == "Ada Lovelace"
    security = page.get_by_label("Security alerts: email (always on)")
    assert security.is_checked() and security.is_disabled()

    marketing_email = page.get_by_label("Marketing: email")
    assert marketing_email.is_checked()
    marketing_email.uncheck()
    page.get_by_label("Quiet hours from").fill("22:00")
    page.get_by_label("to", exact=True).fill("07:00")
    page.get_by_label("Timezone").fill("Europe/London")
    page.get_by_role("button", name="Save preferences").click()
    page.wait_for_selector("#recipient-preferences >> text=Preferences saved.")
    assert not page.get_by_label("Marketing: email").is_checked()
    expect(page.locator("#profile-timezone")).to_have_text("Europe/London")  # out of band

    # Topics switch in place.
    page.get_by_role("button", name="Subscribe").click()
    page.wait_for_selector("#recipient-topics >> text=Subscribed")

    with organization_scope(org.id):
        db.session.expire_all()
        rows = db.session.execute(
            select(Category.key, Preference.channel, Preference.enabled).join(
                Category, Category.id == Preference.category_id
            )
        ).all()
        assert [(key, str(channel), on) for key, channel, on in rows] == [
            ("marketing", "email", False)
        ]
        actions = set(db.session.scalars(select(AuditLog.action)))
        assert {
            "recipient.preferences_updated",
            "recipient.updated",
            "recipient.subscribed",
        } <= actions


def test_import_shows_progress_until_done(
    app, live_server, page, make_org, make_user, redis, tmp_path
):
    from tests.pipeline.conftest import run_jobs

    org = make_org("Acme Cloud")
    make_user("support@example.com", org=org, role=Role.EDITOR)
    db.session.commit()
    good = tmp_path / "people.csv"
    good.write_text("external_id,email,plan\nu-1,one@example.com,pro\nu-2,two@example.com,free\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("external_id,email\nu-3,not-an-email\n")

    page.goto(f"{live_server}/login")
    page.fill("input[name=email]", "support@example.com")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")

    page.goto(f"{live_server}/recipients")
    page.get_by_role("link", name="Import CSV").click()
    page.get_by_label("CSV file").set_input_files(str(bad))
    page.get_by_role("button", name="Check and import").click()
    page.wait_for_selector("text=Waiting for a worker")
    run_jobs(redis)
    page.wait_for_selector("text=Nothing was imported: 1 problem")
    assert page.locator(".import-errors tbody tr").inner_text().split() == [
        "2",
        "email",
        "Not",
        "an",
        "email",
        "address.",
    ]

    page.get_by_role("link", name="Upload a corrected file").click()
    page.get_by_label("CSV file").set_input_files(str(good))
    page.get_by_role("button", name="Check and import").click()
    page.wait_for_selector("progress")
    run_jobs(redis)
    page.wait_for_selector("text=Imported 2 recipients: 2 new, 0 updated.")
    page.get_by_role("link", name="See the recipients").click()
    expect(page.locator("#recipient-rows > tr")).to_have_count(2)
