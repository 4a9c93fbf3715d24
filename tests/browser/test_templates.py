"""Write a template in Chromium, watch the preview follow the typing, publish it."""

from __future__ import annotations

import re

from playwright.sync_api import expect
from sqlalchemy import select

from tests.factories import PASSWORD
from tests.message_templates.test_sms import CASES
from whistle_web.accounts.models import Role
from whistle_web.extensions import db
from whistle_web.models import Template, TemplateVersion
from whistle_web.tenancy import organization_scope


def test_write_a_template_see_the_preview_and_publish_it(
    app, live_server, page, redis, make_org, make_user, make_recipient
):
    org = make_org("Preview Co")
    user = make_user("writer@example.com", org=org, role=Role.EDITOR)
    make_recipient(org, "grace-1", email="grace@example.com", name="Grace Hopper")
    db.session.commit()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(f"{live_server}/login")
    page.fill("input[name=email]", user.email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server}/")

    page.get_by_role("link", name="Templates").click()
    expect(page.locator(".empty")).to_contain_text("No templates yet")
    page.get_by_role("link", name="New template").first.click()
    page.fill("input[name=name]", "Order shipped")
    page.fill("input[name=key]", "order-shipped")

    # Typing re-renders the preview (debounced htmx) with the sample recipient.
    subject = page.locator("#f-email_subject")
    subject.click()
    subject.press_sequentially("Hello {{ recipient.name }}", delay=10)
    expect(page.locator(".preview-subject")).to_contain_text("Hello Ada Lovelace")
    page.fill(
        "#f-preview_data", '{"order": "A-17", "x": "<script>parent.document.title=1</script>"}'
    )
    body = page.locator("#f-email_html")
    body.click()
    body.press_sequentially(
        "<p>Order {{ data.order }} {{ data.x }}</p><script>parent.document.title='pwned'</script>",
        delay=5,
    )
    frame = page.frame_locator("iframe.preview-frame")
    expect(frame.locator("p")).to_contain_text(
        "Order A-17 <script>parent.document.title=1</script>"
    )
    assert page.title() != "pwned" and "pwned" not in page.title()

    # An unknown variable is flagged under its field as you type, and clears when fixed.
    body.press_sequentially(" {{ order }}", delay=10)
    expect(page.locator("#error-email_html")).to_contain_text("unknown variable 'order'")
    for _ in range(len(" {{ order }}")):
        body.press("Backspace")
    expect(page.locator("#error-email_html")).to_be_empty()

    # The channel tabs work from the keyboard; the SMS counter follows the text live.
    page.locator("#tab-email").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-sms")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-sms")).to_be_visible()
    expect(page.locator("#panel-email")).to_be_hidden()
    sms = page.locator("#f-sms_text")
    sms.fill("x" * 150)
    expect(page.locator("#sms-live")).to_contain_text("1 segment (GSM-7, 160 per segment)")
    sms.press_sequentially("y" * 11, delay=5)
    expect(page.locator("#sms-live")).to_contain_text("2 segments (GSM-7, 153 per segment)")
    sms.fill("Order {{ data.order }} shipped 📦")
    expect(page.locator("#sms-live")).to_contain_text("UCS-2, 70 per segment")
    expect(page.locator("[data-channel=sms] .preview-sms")).to_contain_text("Order A-17 shipped 📦")
    # The script counts exactly as the server does.
    for text, encoding, units, segments in CASES:
        count = page.evaluate("t => window.whistleSmsCount(t)", text)
        assert (count["encoding"], count["units"], count["segments"]) == (
            encoding,
            units,
            segments,
        ), text

    # Preview as a real recipient, found by email.
    page.fill("#f-recipient-q", "grace")
    page.get_by_role("button", name=re.compile("grace-1")).click()
    expect(page.locator(".tpl-as")).to_contain_text("grace-1")
    page.locator("#tab-email").click()
    expect(page.locator(".preview-subject")).to_contain_text("Hello Grace Hopper")

    page.keyboard.press("Control+s")  # saves, as the "Create draft" button does
    page.wait_for_url(re.compile(r"/templates/\d+$"))
    expect(page.locator(".flashes")).to_contain_text("created as a draft")
    expect(page.locator(".tpl-actions")).to_contain_text("draft v1")
    page.get_by_role("button", name="Save and publish").click()
    expect(page.locator(".flashes")).to_contain_text("Version 1 is published")
    expect(page.locator(".tpl-actions")).to_contain_text("published v1")
    assert errors == []

    with organization_scope(org.id):
        template = db.session.scalar(select(Template).where(Template.key == "order-shipped"))
        version = db.session.get(TemplateVersion, template.published_version_id)
        assert version.content["sms"] == {"text": "Order {{ data.order }} shipped 📦"}
        assert "{{ order }}" not in version.content["email"]["html"]
