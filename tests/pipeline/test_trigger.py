"""Triggers: validation, planning, sending in-app through real workers, idempotency, cancel."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, assert_counters_match_ledger
from whistle_web.channels.in_app import inbox_channel
from whistle_web.deliveries.models import Delivery, StatScope
from whistle_web.errors import InvalidState, ValidationError
from whistle_web.extensions import db
from whistle_web.models import (
    AuditLog,
    Notification,
    Recipient,
    SendRequest,
    Subscription,
    Topic,
)
from whistle_web.notifications.models import SendRequestStatus
from whistle_web.notifications.services import cancel_notification, cancel_send_request, trigger
from whistle_web.tenancy import organization_scope


@pytest.fixture
def welcome(org, make_template):
    return make_template(org, "welcome", CONTENT)


def test_trigger_to_inline_and_known_recipients_sends_in_app(
    org, welcome, make_recipient, in_app_provider, redis, jobs, statuses
):
    known = make_recipient(org, "u-1", name="Ada")
    pubsub = redis.pubsub()
    # Pub/sub ignores Redis database numbers: listen to this organization's channels only.
    pubsub.psubscribe(f"whistle:inbox:{org.id}:*")
    with organization_scope(org.id):
        request = trigger(
            "welcome",
            to=["u-1", {"external_id": "u-2", "name": "Grace", "attributes": {"plan": "pro"}}],
            channels=["in_app"],
            data={"reason": "signup"},
            actor=SYSTEM,
        )
        assert request.status == SendRequestStatus.PENDING
    # One job: a trigger to a few listed recipients is sent by its planning job.
    assert jobs() == 1
    assert statuses() == {"sent": 2}
    with organization_scope(org.id):
        created = db.session.scalar(select(Recipient).where(Recipient.external_id == "u-2"))
        assert created.attributes == {"plan": "pro"}
        delivery = db.session.scalar(select(Delivery).where(Delivery.recipient_id == known.id))
        assert delivery.rendered == {"title": "Hello Ada", "body": "signup"}
        assert db.session.get(SendRequest, request.id).status == SendRequestStatus.PLANNED
    messages = []
    for _ in range(20):
        message = pubsub.get_message(timeout=0.2)
        if message and message["type"] == "pmessage":
            messages.append(message)
    pubsub.close()
    assert {m["channel"].decode() for m in messages} == {
        inbox_channel(org.id, known.id),
        inbox_channel(org.id, created.id),
    }
    payload = json.loads(next(m for m in messages if b":%d" % known.id in m["channel"])["data"])
    assert payload["title"] == "Hello Ada" and payload["type"] == "notification"
    counts = assert_counters_match_ledger(org.id, StatScope.TEMPLATE, welcome.id)
    assert counts["targeted"] == 2 and counts["sent"] == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"to": ["nobody"]}, "to[0]"),
        ({"to": [{"external_id": "x", "email": "not-an-address"}]}, "to[0].email"),
        ({"to": [{"external_id": "x", "timezone": "Mars/Olympus"}]}, "to[0].timezone"),
        ({"to": ["u"], "channels": ["pigeon"]}, "channels[0]"),
        ({"to": ["u"], "channels": ["webhook", "email", "carrier"]}, "channels[2]"),
        ({"topic": "no-such-topic"}, "topic"),
        ({"to": ["u"], "topic": "news"}, "to"),
        ({}, "to"),
    ],
)
def test_bad_triggers_name_the_field_and_write_nothing(
    org, welcome, make_recipient, kwargs, field, redis
):
    make_recipient(org, "u")
    with organization_scope(org.id):
        with pytest.raises(ValidationError) as error:
            trigger("welcome", actor=SYSTEM, **kwargs)
        assert field in [e.field for e in error.value.errors]
        assert db.session.scalar(select(func.count()).select_from(SendRequest)) == 0
    assert redis.keys("rq:job:*") == []


def test_unknown_or_unpublished_templates_are_refused(org, make_recipient):
    make_recipient(org, "u")
    with organization_scope(org.id), pytest.raises(ValidationError, match="No template"):
        trigger("missing", to=["u"], actor=SYSTEM)


def test_same_idempotency_key_returns_the_first_send(
    org, welcome, make_recipient, in_app_provider, jobs, statuses
):
    make_recipient(org, "u")
    with organization_scope(org.id):
        first = trigger(
            "welcome", to=["u"], channels=["in_app"], idempotency_key="k1", actor=SYSTEM
        )
        again = trigger(
            "welcome", to=["u"], channels=["in_app"], idempotency_key="k1", actor=SYSTEM
        )
        assert again.id == first.id
    jobs()
    with organization_scope(org.id):
        again = trigger(
            "welcome", to=["u"], channels=["in_app"], idempotency_key="k1", actor=SYSTEM
        )
    assert again.id == first.id
    jobs()
    assert statuses() == {"sent": 1}


def test_an_expired_idempotency_key_starts_a_new_send(org, welcome, make_recipient, jobs):
    make_recipient(org, "u")
    with organization_scope(org.id):
        first = trigger("welcome", to=["u"], channels=["in_app"], idempotency_key="k", actor=SYSTEM)
        first.created_at = datetime.now(UTC) - timedelta(hours=25)
        db.session.flush()
        second = trigger(
            "welcome", to=["u"], channels=["in_app"], idempotency_key="k", actor=SYSTEM
        )
    assert second.id != first.id


def test_topic_audience(org, welcome, make_recipient, in_app_provider, jobs, statuses):
    a, b, _c = (make_recipient(org, f"t{i}") for i in range(3))
    with organization_scope(org.id):
        topic = Topic(key="news", name="News")
        db.session.add(topic)
        db.session.flush()
        db.session.add_all([Subscription(topic_id=topic.id, recipient_id=r.id) for r in (a, b)])
        db.session.flush()
        trigger("welcome", topic="news", channels=["in_app"], actor=SYSTEM)
    jobs()
    assert statuses() == {"sent": 2}


def test_a_scheduled_send_waits_for_its_time(org, welcome, make_recipient, jobs, statuses):
    from whistle_web.deliveries.sweeper import tick

    make_recipient(org, "u")
    with organization_scope(org.id):
        request = trigger(
            "welcome",
            to=["u"],
            channels=["in_app"],
            send_at=datetime.now(UTC) + timedelta(hours=1),
            actor=SYSTEM,
        )
    assert jobs() == 0
    tick()
    assert jobs() == 0 and statuses() == {}
    with organization_scope(org.id):  # an hour passes
        request.send_at = datetime.now(UTC) - timedelta(seconds=1)
        request.created_at -= timedelta(hours=1)
        db.session.commit()
    tick()
    jobs()
    assert statuses() == {"sent": 1}
    with organization_scope(org.id):
        assert db.session.get(SendRequest, request.id).status == SendRequestStatus.PLANNED


def test_cancel_before_sending(org, welcome, make_recipient, jobs, statuses):
    from whistle_web.deliveries.sweeper import tick

    make_recipient(org, "u")
    later = datetime.now(UTC) + timedelta(hours=1)
    with organization_scope(org.id):
        request = trigger("welcome", to=["u"], channels=["in_app"], send_at=later, actor=SYSTEM)
        assert cancel_send_request(request.id, actor=SYSTEM) == 0
        request.send_at = datetime.now(UTC) - timedelta(seconds=1)
        db.session.commit()
    tick()
    jobs()
    assert statuses() == {}


@pytest.mark.committed
def test_a_cancel_committing_while_planning_starts_is_not_overwritten(
    app, org, welcome, make_recipient
):
    """The planning job locks its request as it reads it: a cancel holding the row makes
    it wait, and it then sees the cancel and plans nothing (it does not write its own
    status over the cancel and send anyway)."""
    from workers.sending import plan_send_request

    make_recipient(org, "u", name="Ada")
    with organization_scope(org.id):
        request_id = trigger("welcome", to=["u"], channels=["in_app"], actor=SYSTEM).id
    db.session.commit()
    outcome: list[str] = []

    def plan() -> None:
        with app.app_context():
            outcome.append(plan_send_request(request_id, org.id))
            db.session.remove()

    with db.engine.connect() as cancelling:  # a cancel's transaction, not committed yet
        cancelling.execute(
            text(
                "UPDATE send_requests SET status = 'cancelled', cancelled_at = now() WHERE id = :id"
            ),
            {"id": request_id},
        )
        planning = threading.Thread(target=plan)
        planning.start()
        planning.join(0.5)
        assert planning.is_alive()  # waiting for the cancel's lock
        cancelling.commit()
    planning.join(10)
    assert outcome == ["0 batches"]
    with organization_scope(org.id):
        db.session.expire_all()
        assert db.session.get(SendRequest, request_id).status == SendRequestStatus.CANCELLED
        assert db.session.scalar(select(func.count()).select_from(Notification)) == 0


def test_cancel_a_notification_whose_deliveries_are_queued(
    org, welcome, make_recipient, jobs, statuses
):
    make_recipient(org, "u", email="u@example.com")
    with organization_scope(org.id):
        trigger("welcome", to=["u"], channels=["in_app", "email"], actor=SYSTEM)
    from whistle_web.deliveries import planner

    with organization_scope(org.id):
        request = db.session.scalar(select(SendRequest))
    with organization_scope(org.id):
        # Planned: the in-app item is written sent by planning itself, the email is queued
        # for its channel job (which the planning job would also run for a small trigger).
        planner.plan(request.id)
    with organization_scope(org.id):
        notification = db.session.scalar(select(Notification))
        assert cancel_notification(notification.id, actor=SYSTEM) == 1
        with pytest.raises(InvalidState):
            cancel_notification(notification.id, actor=SYSTEM)
        audits = db.session.execute(select(AuditLog.action, AuditLog.target_id, AuditLog.changes))
        assert [tuple(a) for a in audits] == [
            ("notification.cancelled", str(notification.id), {"cancelled": 1})
        ]
    jobs()
    assert statuses() == {"sent": 1, "cancelled": 1}
