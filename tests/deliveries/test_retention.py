"""Retention deletes old events and batches but keeps deliveries and counters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, run_jobs
from whistle_web.deliveries.models import Delivery, DeliveryBatch, DeliveryEvent, DeliveryStat
from whistle_web.deliveries.retention import apply_retention
from whistle_web.extensions import db
from whistle_web.models import SendRequest
from whistle_web.notifications.services import trigger
from whistle_web.tenancy import organization_scope, unscoped


def _count(model):
    return db.session.scalar(unscoped(select(func.count()).select_from(model)))


def test_old_events_and_batches_go_deliveries_and_counters_stay(
    org, make_template, make_recipient, redis
):
    make_template(org, "t", CONTENT)
    make_recipient(org, "r", email="r@example.com")
    with organization_scope(org.id):
        # The email goes through a channel batch (in-app items are written sent by planning).
        trigger("t", to=["r"], channels=["in_app", "email"], idempotency_key="k", actor=SYSTEM)
    run_jobs(redis)
    with organization_scope(org.id):
        delivery = db.session.scalar(select(Delivery))
        db.session.add(DeliveryEvent(delivery_id=delivery.id, type="seen"))
        db.session.flush()
    counters = _count(DeliveryStat)

    report = apply_retention(event_days=30)
    assert report.events == 0 and report.batches == 0 and report.idempotency_keys == 0

    later = datetime.now(UTC) + timedelta(days=45)
    report = apply_retention(event_days=30, now=later)
    assert report.events == 1 and report.batches == 1 and report.idempotency_keys == 1
    assert _count(DeliveryEvent) == 0 and _count(DeliveryBatch) == 0
    assert _count(Delivery) == 2 and _count(DeliveryStat) == counters
    assert db.session.scalar(unscoped(select(SendRequest.idempotency_key))) is None
