"""The delivery ledger only moves forward, in Python and in PostgreSQL alike."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import text, update
from sqlalchemy.exc import DBAPIError

from whistle_web.channels.kinds import Channel
from whistle_web.deliveries.models import Delivery, DeliveryEvent, InvalidTransition
from whistle_web.deliveries.status import DeliveryStatus, can_transition, predecessors
from whistle_web.extensions import db
from whistle_web.models import Notification
from whistle_web.tenancy import organization_scope

S = DeliveryStatus


@pytest.fixture
def make_delivery(org, make_recipient, make_send_request):
    recipient = make_recipient(org, "r1", email="r1@example.com")
    request = make_send_request(org, audience={"type": "recipients", "ids": [recipient.id]})
    notification = None
    channels = itertools.cycle(Channel)

    def make(status: DeliveryStatus = S.QUEUED) -> Delivery:
        with organization_scope(org.id):
            nonlocal notification
            channel = next(channels)
            if channel == Channel.EMAIL:  # a fresh notification every five deliveries
                notification = Notification(send_request_id=request.id, recipient_id=None)
                db.session.add(notification)
                db.session.flush()
            delivery = Delivery(
                notification_id=notification.id,
                recipient_id=recipient.id,
                channel=channel,
                status=status,
            )
            db.session.add(delivery)
            db.session.flush()
            return delivery

    return make


def test_forward_moves_are_allowed_and_skips_too():
    assert can_transition(S.QUEUED, S.SENDING)
    assert can_transition(S.SENT, S.READ)  # in-app: seen is implied by read
    assert can_transition(S.DELIVERED, S.CLICKED)  # email: click without the pixel
    assert can_transition(S.SENDING, S.QUEUED)  # released before the provider took it
    assert can_transition(S.QUEUED, S.SUPPRESSED)
    assert can_transition(S.SENT, S.BOUNCED)


def test_backward_and_final_moves_are_refused():
    assert not can_transition(S.READ, S.DELIVERED)  # a late "delivered" never undoes read
    assert not can_transition(S.SENT, S.QUEUED)
    assert not can_transition(S.SENT, S.FAILED)
    assert not can_transition(S.QUEUED, S.BOUNCED)
    for final in (S.SUPPRESSED, S.FAILED, S.BOUNCED, S.CANCELLED):
        assert not any(can_transition(final, s) for s in S if s != final)


def test_predecessors_lists_every_status_that_may_move_to_the_target():
    assert set(predecessors(S.READ)) == {S.QUEUED, S.SENDING, S.SENT, S.DELIVERED, S.SEEN}
    assert set(predecessors(S.CANCELLED)) == {S.QUEUED, S.SENDING}


def test_model_refuses_to_move_backwards(make_delivery):
    delivery = make_delivery(S.READ)
    with pytest.raises(InvalidTransition):
        delivery.status = S.DELIVERED


@pytest.mark.parametrize("old", list(S))
def test_database_trigger_agrees_with_python_on_every_pair(org, make_delivery, old):
    rows = {new: make_delivery(old) for new in S}
    with organization_scope(org.id):
        for new, delivery in rows.items():
            allowed = can_transition(old, new)
            savepoint = db.session.begin_nested()
            try:
                # Bulk SQL bypasses the ORM validator: only the trigger stands in the way.
                db.session.execute(
                    update(Delivery).where(Delivery.id == delivery.id).values(status=new)
                )
                db.session.flush()
                savepoint.commit()
                moved = True
            except DBAPIError as error:
                savepoint.rollback()
                assert "cannot move" in str(error.orig)
                moved = False
            assert moved == allowed, f"{old} -> {new}: trigger {moved}, python {allowed}"


def test_delivery_events_are_append_only(org, make_delivery):
    delivery = make_delivery(S.SENT)
    with organization_scope(org.id):
        event = DeliveryEvent(delivery_id=delivery.id, type="sent")
        db.session.add(event)
        db.session.flush()
        with pytest.raises(DBAPIError, match="append-only"):
            db.session.execute(
                text("UPDATE delivery_events SET type = 'read' WHERE id = :id"), {"id": event.id}
            )
