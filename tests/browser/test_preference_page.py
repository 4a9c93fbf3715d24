"""The hosted preference page in Chromium: toggles, topics and quiet hours persist."""

from __future__ import annotations

from datetime import time

from sqlalchemy import select

from whistle_web.audiences.models import Subscription, Topic
from whistle_web.extensions import db
from whistle_web.models import Category, Preference, Recipient
from whistle_web.tenancy import organization_scope
from whistle_web.tracking import links


def test_preference_toggles_persist(app, live_server, page, make_org, make_recipient):
    org = make_org("Acme Cloud")
    with organization_scope(org.id):
        db.session.add_all(
            [
                Category(key="billing", name="Billing"),
                Category(key="marketing", name="Marketing"),
                Category(key="security", name="Security alerts", critical=True),
                Topic(key="newsletter", name="Monthly newsletter"),
            ]
        )
    recipient = make_recipient(org, "ada", email="ada@example.com", timezone="Europe/Berlin")
    db.session.commit()
    url = links.preferences_url(live_server, app.config["SECRET_KEY"], org.id, recipient.id)

    page.goto(url)
    assert page.locator("h1").inner_text() == "Notification preferences"
    security = page.get_by_label("Security alerts by Email")
    assert security.is_checked() and security.is_disabled()
    marketing_email = page.get_by_label("Marketing by Email")
    assert marketing_email.is_checked()
    marketing_email.uncheck()
    page.get_by_label("Marketing by SMS").uncheck()
    page.get_by_label("Monthly newsletter").check()
    page.get_by_label("Quiet hours start").fill("22:00")
    page.get_by_label("Quiet hours end").fill("07:00")
    page.get_by_label("Your time zone").fill("Asia/Tokyo")
    page.get_by_role("button", name="Save preferences").click()
    page.wait_for_selector("text=Your preferences are saved.")

    with organization_scope(org.id):
        db.session.expire_all()
        rows = db.session.execute(
            select(Category.key, Preference.channel, Preference.enabled)
            .join(Category, Category.id == Preference.category_id)
            .where(Preference.recipient_id == recipient.id)
        ).all()
        assert {(key, str(channel), on) for key, channel, on in rows} == {
            ("marketing", "email", False),
            ("marketing", "sms", False),
        }
        saved = db.session.get(Recipient, recipient.id)
        assert (saved.quiet_hours_start, saved.quiet_hours_end) == (time(22), time(7))
        assert saved.timezone == "Asia/Tokyo"
        assert db.session.scalar(
            select(Subscription.id).where(Subscription.recipient_id == recipient.id)
        )

    # After a reload the page shows what was stored.
    page.reload()
    assert not page.get_by_label("Marketing by Email").is_checked()
    assert page.get_by_label("Billing by Email").is_checked()
    assert page.get_by_label("Monthly newsletter").is_checked()
    assert page.get_by_label("Your time zone").input_value() == "Asia/Tokyo"

    # A bad time zone is refused with a message, nothing saved.
    page.get_by_label("Billing by Email").uncheck()
    page.get_by_label("Your time zone").fill("Nowhere/Special")
    page.get_by_role("button", name="Save preferences").click()
    assert "Not a known time zone" in page.locator("#timezone-error").inner_text()
    assert page.get_by_label("Your time zone").get_attribute("aria-invalid") == "true"
    with organization_scope(org.id):
        db.session.expire_all()
        assert db.session.get(Recipient, recipient.id).timezone == "Asia/Tokyo"

    # Unsubscribe from everything, then resubscribe.
    page.goto(url)
    page.get_by_role("button", name="Unsubscribe from everything").click()
    page.wait_for_selector("text=You are unsubscribed")
    with organization_scope(org.id):
        db.session.expire_all()
        assert db.session.get(Recipient, recipient.id).unsubscribed_at is not None
    page.get_by_role("button", name="Resubscribe").click()
    page.wait_for_selector("text=You are subscribed again.")
    with organization_scope(org.id):
        db.session.expire_all()
        assert db.session.get(Recipient, recipient.id).unsubscribed_at is None
