"""Email end to end: planner, worker, SMTP provider and a real SMTP server."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, assert_counters_match_ledger
from tests.smtp_sink import SmtpSink, free_port
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.deliveries.models import Delivery, StatScope
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.extensions import db
from whistle_web.models import Provider
from whistle_web.notifications.services import trigger
from whistle_web.tenancy import organization_scope


@pytest.fixture
def sink():
    with SmtpSink(refuse={"refused@example.com"}) as sink:
        yield sink


def smtp_provider(org, port: int, *, name: str = "SMTP", priority: int = 10, rate=None) -> Provider:
    with organization_scope(org.id):
        provider = Provider(
            channel=Channel.EMAIL,
            kind=ProviderKind.SMTP,
            name=name,
            priority=priority,
            rate_limit_per_second=rate,
            settings={
                "host": "127.0.0.1",
                "port": port,
                "use_tls": "none",
                "from_email": "hi@acme.example.com",
            },
        )
        provider.set_credentials({})
        db.session.add(provider)
        db.session.flush()
    return provider


def _recipients(org, make_recipient, n=5):
    return [make_recipient(org, f"r{i}", email=f"r{i}@example.com", name=f"R{i}") for i in range(n)]


def test_emails_arrive_with_tracking_and_one_click_unsubscribe(
    org, make_template, make_recipient, sink, jobs, statuses
):
    make_template(org, "welcome", CONTENT)
    smtp_provider(org, sink.port)
    _recipients(org, make_recipient, 3)
    with organization_scope(org.id):
        trigger("welcome", to=["r0", "r1", "r2"], channels=["email"], actor=SYSTEM)
    jobs()
    assert statuses() == {"sent": 3}
    assert sorted(m["To"] for m in sink.messages) == [f"r{i}@example.com" for i in range(3)]
    message = next(m for m in sink.messages if m["To"] == "r0@example.com")
    assert message["Subject"] == "Hello R0"
    unsubscribe = str(message["List-Unsubscribe"]).strip()
    assert unsubscribe.startswith("<http") and "/t/u/" in unsubscribe
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    html = next(p for p in message.walk() if p.get_content_type() == "text/html").get_content()
    assert "/t/c/" in html and "https://example.com/x" not in html  # link tracked
    assert "/t/o/" in html  # open pixel
    text = next(p for p in message.walk() if p.get_content_type() == "text/plain").get_content()
    assert "Hi R0 (no reason)" in text
    assert sink.handler.connections == 1  # one SMTP session for the batch
    with organization_scope(org.id):
        delivery = db.session.scalar(select(Delivery).where(Delivery.address == "r0@example.com"))
        assert message["Message-ID"].strip("<>") == delivery.provider_message_id
        assert delivery.rendered["subject"] == "Hello R0"


def test_failover_to_the_next_provider_when_one_is_down(
    org, make_template, make_recipient, sink, jobs, statuses
):
    make_template(org, "welcome", CONTENT)
    down = smtp_provider(org, free_port(), name="Down", priority=1)
    up = smtp_provider(org, sink.port, name="Up", priority=2)
    _recipients(org, make_recipient, 4)
    with organization_scope(org.id):
        trigger("welcome", to=[f"r{i}" for i in range(4)], channels=["email"], actor=SYSTEM)
    jobs()
    assert statuses() == {"sent": 4}
    assert len(sink.messages) == 4
    with organization_scope(org.id):
        used = set(db.session.scalars(select(Delivery.provider_id)))
    assert used == {up.id} and down.id not in used


def test_permanent_errors_fail_one_delivery_transient_ones_retry(
    org, make_template, make_recipient, sink, jobs, statuses
):
    make_template(org, "welcome", CONTENT)
    smtp_provider(org, sink.port)
    make_recipient(org, "ok", email="ok@example.com")
    make_recipient(org, "bad", email="refused@example.com")
    with organization_scope(org.id):
        trigger("welcome", to=["ok", "bad"], channels=["email"], actor=SYSTEM)
    jobs()
    assert statuses() == {"sent": 1, "failed": 1}
    with organization_scope(org.id):
        failed = db.session.scalar(select(Delivery).where(Delivery.status == DeliveryStatus.FAILED))
    assert "550" in failed.error


def test_all_providers_down_requeues_with_backoff(
    org, make_template, make_recipient, jobs, statuses
):
    make_template(org, "welcome", CONTENT)
    smtp_provider(org, free_port())
    make_recipient(org, "r", email="r@example.com")
    with organization_scope(org.id):
        trigger("welcome", to=["r"], channels=["email"], actor=SYSTEM)
    jobs()
    assert statuses() == {"queued": 1}
    with organization_scope(org.id):
        delivery = db.session.scalar(select(Delivery))
        assert delivery.attempts == 1 and delivery.not_before is not None
        assert "unavailable" in delivery.error


def test_a_template_error_fails_only_that_delivery(
    org, make_template, make_recipient, sink, jobs, statuses
):
    broken = {
        "email": {
            "subject": "{{ recipient.attributes.plan.upper() }}",  # None.upper() for some
            "text": "x",
        }
    }
    make_template(org, "plan", broken)
    smtp_provider(org, sink.port)
    make_recipient(org, "pro", email="pro@example.com", attributes={"plan": "pro"})
    make_recipient(org, "none", email="none@example.com")
    with organization_scope(org.id):
        trigger("plan", to=["pro", "none"], channels=["email"], actor=SYSTEM)
    jobs()
    assert statuses() == {"sent": 1, "failed": 1}
    with organization_scope(org.id):
        failed = db.session.scalar(select(Delivery).where(Delivery.status == DeliveryStatus.FAILED))
    assert failed.error.startswith("template error: email.subject")
    assert [m["Subject"] for m in sink.messages] == ["PRO"]


def test_a_runaway_template_fails_its_delivery_within_the_time_limit(
    org, make_template, make_recipient, sink, jobs, statuses, monkeypatch
):
    from whistle_web.message_templates import rendering

    monkeypatch.setattr(rendering, "RENDER_SECONDS", 0.2)
    slow = (
        "{% if recipient.attributes.slow %}{% for a in range(10000) %}"
        "{% for b in range(10000) %}{% endfor %}{% endfor %}{% endif %}Hi"
    )
    make_template(org, "slow", {"email": {"subject": "Hello", "text": slow}})
    smtp_provider(org, sink.port)
    make_recipient(org, "slow", email="slow@example.com", attributes={"slow": True})
    make_recipient(org, "fast", email="fast@example.com")
    with organization_scope(org.id):
        trigger("slow", to=["slow", "fast"], channels=["email"], actor=SYSTEM)
    jobs()
    assert statuses() == {"sent": 1, "failed": 1}
    with organization_scope(org.id):
        failed = db.session.scalar(select(Delivery).where(Delivery.status == DeliveryStatus.FAILED))
    assert failed.error == "template error: email.text: rendering took longer than 0.2 s"
    assert [m["To"] for m in sink.messages] == ["fast@example.com"]


def test_the_sandbox_blocks_python_internals(
    org, make_template, make_recipient, sink, jobs, statuses
):
    make_template(
        org,
        "evil",
        {"email": {"subject": "{{ ''.__class__.__mro__[1].__subclasses__() }}", "text": "x"}},
    )
    smtp_provider(org, sink.port)
    make_recipient(org, "r", email="r@example.com")
    with organization_scope(org.id):
        trigger("evil", to=["r"], channels=["email"], actor=SYSTEM)
    jobs()
    assert statuses() == {"failed": 1}
    assert sink.messages == []


def test_html_is_autoescaped(org, make_template, make_recipient, sink, jobs):
    make_template(
        org,
        "x",
        {"email": {"subject": "{{ recipient.name }}", "html": "<p>{{ recipient.name }}</p>"}},
    )
    smtp_provider(org, sink.port)
    make_recipient(org, "r", email="r@example.com", name="<script>alert(1)</script>")
    with organization_scope(org.id):
        trigger("x", to=["r"], channels=["email"], actor=SYSTEM)
    jobs()
    html = next(
        p for p in sink.messages[0].walk() if p.get_content_type() == "text/html"
    ).get_content()
    assert "&lt;script&gt;" in html and "<script>" not in html


def test_funnel_counters_equal_the_ledger(org, make_template, make_recipient, sink, jobs):
    template = make_template(org, "welcome", CONTENT)
    smtp_provider(org, sink.port)
    make_recipient(org, "ok", email="ok@example.com")
    make_recipient(org, "bad", email="refused@example.com")
    make_recipient(org, "none")
    with organization_scope(org.id):
        trigger("welcome", to=["ok", "bad", "none"], channels=["email", "in_app"], actor=SYSTEM)
    jobs()
    counts = assert_counters_match_ledger(org.id, StatScope.TEMPLATE, template.id)
    assert counts["targeted"] == 6
    assert counts["suppressed"] == 1 and counts["failed"] == 1 and counts["sent"] == 4
