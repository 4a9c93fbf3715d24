"""Why deliveries failed or bounced, and clicks per link: every writer stores the reason and
counts it, and the live counters equal a recount of the ledger (rebuild_stats)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, assert_counters_match_ledger, run_jobs
from tests.smtp_sink import SmtpSink, free_port
from tests.tracking import assert_counters_match_ledger as assert_funnel_matches_ledger
from tests.tracking import make_delivery
from whistle_web.channels.base import SendResult
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.deliveries.dispatch import MAX_ATTEMPTS, run_batch
from whistle_web.deliveries.failures import FailureReason, bounce_reason, failure_reason
from whistle_web.deliveries.ledger import record_event
from whistle_web.deliveries.models import Delivery, DeliveryBatch, DeliveryLinkStat, StatScope
from whistle_web.deliveries.services import funnel, rebuild_stats, top_clicked_links
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.deliveries.sweeper import _fail_interrupted
from whistle_web.extensions import db
from whistle_web.models import Provider
from whistle_web.notifications.services import trigger
from whistle_web.tenancy import organization_scope
from whistle_web.tracking.views import twilio_event

R = FailureReason


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (SendResult.failed(1, "the recipient was deleted"), R.RECIPIENT_DELETED),
        (SendResult.failed(1, "template error: email.subject: boom"), R.TEMPLATE_ERROR),
        (SendResult.failed(1, "no active device or address"), R.NO_ADDRESS),
        (SendResult.failed(1, "no enabled sms provider"), R.NO_PROVIDER),
        (SendResult.failed(1, "all providers unavailable (x)", transient=True), R.GAVE_UP),
        (
            SendResult(1, False, error="21211 invalid number", invalid_address=True),
            R.INVALID_ADDRESS,
        ),
        (SendResult.failed(1, "550 mailbox unavailable"), R.PROVIDER_REJECTED),
        (SendResult.failed(1, ""), R.PROVIDER_REJECTED),
    ],
)
def test_why_a_send_failed(result, reason):  # type: ignore[no-untyped-def]
    assert failure_reason(result) == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({}, R.HARD_BOUNCE),
        ({"bounce_type": "permanent", "bounce_sub_type": "General"}, R.HARD_BOUNCE),
        ({"bounce_type": "permanent", "bounce_sub_type": "OnAccountSuppressionList"}, R.PROVIDER_SUPPRESSED),
        ({"bounce_type": "permanent", "bounce_sub_type": "Suppressed"}, R.PROVIDER_SUPPRESSED),
        (twilio_event("undelivered", "30005")[1], R.HARD_BOUNCE),
        (twilio_event("failed", "21610")[1], R.PROVIDER_SUPPRESSED),
        ({"bounce_type": "transient"}, R.SOFT_BOUNCE),
    ],
)  # fmt: skip
def test_why_a_message_bounced(data, reason):  # type: ignore[no-untyped-def]
    assert bounce_reason(data) == reason


# --- the send path ---------------------------------------------------------------------------
@pytest.fixture
def sink():  # type: ignore[no-untyped-def]
    with SmtpSink(refuse={"refused@example.com"}) as sink:
        yield sink


def smtp_provider(org, port: int) -> Provider:  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        provider = Provider(
            channel=Channel.EMAIL,
            kind=ProviderKind.SMTP,
            name=f"SMTP {port}",
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


def reasons(org) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        db.session.expire_all()
        return {
            d.address: d.failure_reason and d.failure_reason.value
            for d in db.session.scalars(select(Delivery))
        }


def test_dispatch_stores_and_counts_why_deliveries_failed(  # type: ignore[no-untyped-def]
    org, make_template, make_recipient, sink, redis
):
    plan = {"email": {"subject": "{{ recipient.attributes.plan.upper() }}", "text": "x"}}
    template = make_template(org, "plan", plan)
    smtp_provider(org, sink.port)
    make_recipient(org, "pro", email="pro@example.com", attributes={"plan": "pro"})
    make_recipient(org, "none", email="none@example.com")  # no plan: the subject fails
    make_recipient(org, "bad", email="refused@example.com", attributes={"plan": "pro"})
    with organization_scope(org.id):
        trigger("plan", to=["pro", "none", "bad"], channels=["email"], actor=SYSTEM)
    run_jobs(redis)
    assert reasons(org) == {
        "pro@example.com": None,
        "none@example.com": "template_error",
        "refused@example.com": "provider_rejected",
    }
    counts = assert_counters_match_ledger(org.id, StatScope.TEMPLATE, template.id)
    assert counts["failed"] == 2
    with organization_scope(org.id):
        live = funnel(StatScope.TEMPLATE, template.id)["email"]
    assert live["failed:template_error"] == live["failed:provider_rejected"] == 1


def test_a_channel_without_a_provider_fails_as_no_provider(  # type: ignore[no-untyped-def]
    org, make_template, make_recipient, redis
):
    template = make_template(org, "welcome", CONTENT)
    make_recipient(org, "r", email="r@example.com")
    with organization_scope(org.id):
        trigger("welcome", to=["r"], channels=["email"], actor=SYSTEM)
    run_jobs(redis)
    assert reasons(org) == {"r@example.com": "no_provider"}
    assert_counters_match_ledger(org.id, StatScope.TEMPLATE, template.id)


def test_transient_errors_give_up_after_the_last_attempt(  # type: ignore[no-untyped-def]
    org, make_template, make_recipient, redis
):
    template = make_template(org, "welcome", CONTENT)
    smtp_provider(org, free_port())  # nobody listens: unavailable, retried with a backoff
    make_recipient(org, "r", email="r@example.com")
    with organization_scope(org.id):
        trigger("welcome", to=["r"], channels=["email"], actor=SYSTEM)
    run_jobs(redis)
    assert reasons(org) == {"r@example.com": None}
    with organization_scope(org.id):
        db.session.execute(
            update(Delivery).values(
                attempts=MAX_ATTEMPTS - 1, not_before=datetime.now(UTC) - timedelta(minutes=1)
            )
        )
        batch_id = db.session.scalar(select(Delivery.batch_id))
        db.session.commit()
    with organization_scope(org.id):
        run_batch(batch_id)
    assert reasons(org) == {"r@example.com": "gave_up"}
    with organization_scope(org.id):
        assert db.session.scalar(select(Delivery.error)).startswith("gave up after 5 attempts")
    assert_counters_match_ledger(org.id, StatScope.TEMPLATE, template.id)


def test_deliveries_a_dead_worker_held_fail_as_interrupted(  # type: ignore[no-untyped-def]
    org, make_recipient, make_send_request
):
    request = make_send_request(org)
    recipient = make_recipient(org, "r", email="r@example.com")
    with organization_scope(org.id):
        batch = DeliveryBatch(send_request_id=request.id, channel=Channel.EMAIL)
        db.session.add(batch)
        db.session.flush()
    delivery = make_delivery(org, recipient, request, status=DeliveryStatus.SENDING)
    with organization_scope(org.id):
        db.session.execute(update(Delivery).values(batch_id=batch.id, sent_at=None))
        rebuild_stats(StatScope.TEMPLATE, request.template_id)
        _fail_interrupted(batch, datetime.now(UTC))
        db.session.expire_all()
        assert db.session.get(Delivery, delivery.id).failure_reason == R.INTERRUPTED
    counts = assert_funnel_matches_ledger(org, request.template_id)
    assert counts["all"]["failed"] == counts["email"]["failed:interrupted"] == 1


# --- provider callbacks ----------------------------------------------------------------------
def test_bounces_are_counted_by_reason(org, make_recipient, make_send_request):  # type: ignore[no-untyped-def]
    request = make_send_request(org)
    ses = {"bounce_type": "permanent", "bounce_sub_type": "OnAccountSuppressionList"}
    events = [
        (Channel.EMAIL, {"bounce_type": "permanent", "bounce_sub_type": "General"}),
        (Channel.EMAIL, ses),
        (Channel.SMS, twilio_event("undelivered", "30005")[1]),
        (Channel.SMS, twilio_event("failed", "21610")[1]),
    ]
    deliveries = [
        make_delivery(
            org,
            make_recipient(org, f"b{i}", email=f"b{i}@example.com", phone=f"+1500555000{i}"),
            request,
            channel=channel,
        )
        for i, (channel, _data) in enumerate(events)
    ]
    with organization_scope(org.id):
        for delivery, (_channel, data) in zip(deliveries, events, strict=True):
            record_event(delivery.id, "bounced", data=data)
            record_event(delivery.id, "bounced", data=data)  # a repeat counts once
        record_event(deliveries[0].id, "soft_bounce", data={"bounce_type": "transient"})
        got = {d.id: db.session.get(Delivery, d.id).failure_reason for d in deliveries}
    assert list(got.values()) == [
        R.HARD_BOUNCE,
        R.PROVIDER_SUPPRESSED,
        R.HARD_BOUNCE,
        R.PROVIDER_SUPPRESSED,
    ]
    counts = assert_funnel_matches_ledger(org, request.template_id)
    assert counts["email"]["bounced:hard_bounce"] == counts["sms"]["bounced:hard_bounce"] == 1
    assert counts["all"]["bounced:provider_suppressed"] == 2
    assert counts["all"]["bounced"] == 4
    assert counts["email"]["event:soft_bounce"] == 1  # no ledger move: not a bounce


# --- clicks per link -------------------------------------------------------------------------
def test_clicks_are_counted_per_link_and_equal_a_recount(  # type: ignore[no-untyped-def]
    org, make_recipient, make_send_request
):
    request = make_send_request(org)
    people = [make_recipient(org, f"c{i}", email=f"c{i}@example.com") for i in range(3)]
    email = [make_delivery(org, people[i], request) for i in range(2)]
    in_app = make_delivery(org, people[2], request, channel=Channel.IN_APP)
    a, b = "https://acme.test/a", "https://acme.test/b?" + "x" * 3000  # any length
    with organization_scope(org.id):
        for delivery, url in [(email[0], a), (email[0], a), (email[1], a), (email[1], b)]:
            record_event(delivery.id, "clicked", data={"url": url})
        record_event(in_app.id, "clicked", data={"url": b})
        record_event(in_app.id, "clicked", data={"source": "inbox"})  # no link: not counted
        record_event(in_app.id, "clicked", data={"url": 5})  # not a link either

        template = request.template_id
        assert top_clicked_links(StatScope.TEMPLATE, template) == [(a, 3), (b, 2)]
        assert top_clicked_links(StatScope.TEMPLATE, template, channel="email") == [(a, 3), (b, 1)]
        assert top_clicked_links(StatScope.TEMPLATE, template, limit=1) == [(a, 3)]
        assert top_clicked_links(StatScope.CAMPAIGN, template) == []

        def rows():  # type: ignore[no-untyped-def]
            return sorted(
                db.session.execute(
                    select(
                        DeliveryLinkStat.scope,
                        DeliveryLinkStat.channel,
                        DeliveryLinkStat.url_hash,
                        DeliveryLinkStat.clicks,
                    )
                ).all()
            )

        live = rows()
        assert len(live) == 3  # (email, a), (email, b), (in-app, b)
        rebuild_stats(StatScope.TEMPLATE, template)
        assert rows() == live
