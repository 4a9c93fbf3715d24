"""The organization's email layout: wrapping, validation, and every sent email carries it."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from tests.factories import SYSTEM
from tests.pipeline.conftest import run_jobs
from tests.pipeline.test_email import smtp_provider
from tests.smtp_sink import SmtpSink
from whistle_web.deliveries.models import Delivery
from whistle_web.errors import ValidationError
from whistle_web.extensions import db
from whistle_web.message_templates.layout import apply_layout, compile_layout
from whistle_web.message_templates.rendering import RenderError
from whistle_web.message_templates.services import email_layout, update_email_layout
from whistle_web.models import Organization
from whistle_web.notifications.services import trigger
from whistle_web.tenancy import organization_scope

CONTEXT = {"organization": {"name": "Acme & Co"}, "recipient": {"name": "<Ada>"}, "data": {}}


def settings(**layout):
    return {"email_layout": {"header_html": "", "footer_html": "", "brand_color": "", **layout}}


def test_no_layout_leaves_the_html_alone():
    assert compile_layout({}) is None and compile_layout(settings()) is None
    assert apply_layout("<p>x</p>", {"sender": {}}, CONTEXT) == "<p>x</p>"


def test_a_fragment_is_wrapped_and_variables_are_escaped():
    html = apply_layout(
        "<p>Body</p>",
        settings(
            header_html="<h1>{{ organization.name }}</h1>",
            footer_html="<p>{{ recipient.name }} {{ brand_color }}</p>",
            brand_color="#AA00ff",
        ),
        CONTEXT,
    )
    assert html.startswith("<!doctype html>") and html.endswith("</body></html>")
    assert html.index("<h1>Acme &amp; Co</h1>") < html.index("<p>Body</p>")
    assert html.index("<p>Body</p>") < html.index("<p>&lt;Ada&gt; #aa00ff</p>")
    assert "border-top:4px solid #aa00ff;" in html


def test_a_full_document_keeps_its_head_and_gets_the_layout_inside_its_body():
    document = '<html><head><title>T</title></head><body class="x"><p>Body</p></body></html>'
    html = apply_layout(document, settings(header_html="H", footer_html="F"), CONTEXT)
    assert html.startswith('<html><head><title>T</title></head><body class="x"><div')
    assert html.endswith("</div></body></html>")
    assert html.index("H") < html.index("<p>Body</p>") < html.index(">F<")


def test_a_colour_that_is_not_rrggbb_never_reaches_the_html():
    # Stored around the validation (an old row, a direct write): ignored when applied.
    html = apply_layout(
        "<p>x</p>", settings(header_html="H", brand_color='red;"><script>x</script>'), CONTEXT
    )
    assert "border-top" not in html and "<script>" not in html


def test_a_layout_that_fails_to_render_says_so():
    with pytest.raises(RenderError, match="email layout header: integer division"):
        apply_layout("<p>x</p>", settings(header_html="{{ 1 // 0 }}"), CONTEXT)


def test_update_email_layout_validates_and_keeps_other_settings(org):
    with organization_scope(org.id):
        organization = db.session.get(Organization, org.id)
        organization.settings = {"sender": {"from_name": "Acme"}}
        db.session.flush()
        with pytest.raises(ValidationError) as caught:
            update_email_layout(
                header_html="{{ nope }}", footer_html="{% if %}", brand_color="blue", actor=SYSTEM
            )
        assert {e.field for e in caught.value.errors} == {
            "header_html",
            "footer_html",
            "brand_color",
        }
        update_email_layout(
            header_html="<b>{{ brand_color }}</b>",
            footer_html="",
            brand_color="#ABCDEF",
            actor=SYSTEM,
        )
        db.session.refresh(organization)
        assert organization.settings["sender"] == {"from_name": "Acme"}
        assert email_layout() == {
            "header_html": "<b>{{ brand_color }}</b>",
            "footer_html": "",
            "brand_color": "#abcdef",
        }


@pytest.fixture
def sink():
    with SmtpSink() as sink:
        yield sink


CONTENT = {
    "email": {
        "subject": "Hello {{ recipient.name }}",
        "html": "<p>Hi {{ recipient.name }}, see <a href='https://example.com/x'>this</a></p>",
        "text": "Hi {{ recipient.name }}",
    }
}


def test_every_sent_email_carries_the_layout(org, make_template, make_recipient, sink, redis):
    make_template(org, "welcome", CONTENT)
    smtp_provider(org, sink.port)
    for i in range(2):
        make_recipient(org, f"r{i}", email=f"r{i}@example.com", name=f"R{i}")
    with organization_scope(org.id):
        update_email_layout(
            header_html="<div class='head'>{{ organization.name }} for {{ recipient.name }}</div>",
            footer_html="<a href='{{ unsubscribe_url }}'>Unsubscribe</a>"
            " <a href='{{ preferences_url }}'>Preferences</a>",
            brand_color="#123456",
            actor=SYSTEM,
        )
        trigger("welcome", to=["r0", "r1"], channels=["email"], actor=SYSTEM)
    run_jobs(redis)
    assert len(sink.messages) == 2
    message = next(m for m in sink.messages if m["To"] == "r0@example.com")
    html = next(p for p in message.walk() if p.get_content_type() == "text/html").get_content()
    assert "<div class='head'>Acme for R0</div>" in html
    assert "border-top:4px solid #123456;" in html
    assert html.index("Acme for R0") < html.index("Hi R0") < html.index("Unsubscribe")
    # The footer's links are the delivery's own (not click-tracked); the body's link is.
    unsubscribe = str(message["List-Unsubscribe"]).strip().strip("<>")
    assert f"href='{unsubscribe}'" in html and "/p/" in html
    assert "/t/c/" in html and "https://example.com/x" not in html
    assert html.index("/t/o/") < html.index("</body>")  # the open pixel stays in the body
    text = next(p for p in message.walk() if p.get_content_type() == "text/plain").get_content()
    assert "Acme" not in text  # the layout is HTML only
    with organization_scope(org.id):
        statuses = set(db.session.scalars(select(Delivery.status)))
    assert statuses == {"sent"}


def test_a_layout_that_fails_at_send_fails_the_delivery_with_its_reason(
    org, make_template, make_recipient, sink, redis
):
    make_template(org, "welcome", CONTENT)
    smtp_provider(org, sink.port)
    make_recipient(org, "r0", email="r0@example.com", name="R0")
    with organization_scope(org.id):
        organization = db.session.get(Organization, org.id)
        organization.settings = {"email_layout": {"header_html": "{{ 1 // 0 }}"}}
        db.session.flush()
        trigger("welcome", to=["r0"], channels=["email"], actor=SYSTEM)
    run_jobs(redis)
    assert not sink.messages
    with organization_scope(org.id):
        delivery = db.session.scalar(select(Delivery))
        assert delivery.status == "failed" and "email layout" in delivery.error
