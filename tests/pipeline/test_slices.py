"""Planning slices and in-app items written sent by the planner."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, assert_counters_match_ledger
from whistle_web.campaigns.models import Campaign, CampaignStatus
from whistle_web.campaigns.services import create_campaign, launch_campaign
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.deliveries import planner
from whistle_web.deliveries.models import BatchStatus, Delivery, DeliveryBatch, StatScope
from whistle_web.deliveries.sweeper import tick
from whistle_web.extensions import db
from whistle_web.models import Provider, SendRequest
from whistle_web.notifications.services import trigger
from whistle_web.tenancy import organization_scope
from workers.sending import plan_send_request, send_batch

pytestmark = pytest.mark.usefixtures("small_batches")


@pytest.fixture
def audience(org, make_recipient, make_template):
    make_template(org, "digest", CONTENT)
    return [make_recipient(org, f"s{i:02d}", name=f"S{i}") for i in range(25)]


def _launch(org, **kwargs):
    with organization_scope(org.id):
        campaign = create_campaign(
            "Digest",
            template_key="digest",
            channels=kwargs.pop("channels", ["in_app"]),
            audience_type="all",
            actor=SYSTEM,
            **kwargs,
        )
        launch_campaign(campaign.id, actor=SYSTEM)
        request = db.session.scalar(
            select(SendRequest).where(SendRequest.campaign_id == campaign.id)
        )
    return campaign, request


def _slices(org, request):
    with organization_scope(org.id):
        return list(
            db.session.scalars(
                select(DeliveryBatch)
                .where(DeliveryBatch.send_request_id == request.id)
                .order_by(DeliveryBatch.id)
            )
        )


def test_slices_cover_the_audience_once_and_in_order(org, audience, jobs, statuses, redis):
    campaign, request = _launch(org)
    plan_send_request(request.id, org.id)
    slices = _slices(org, request)
    bounds = [(s.first_recipient_id, s.last_recipient_id, s.size) for s in slices]
    ids = [r.id for r in audience]
    assert bounds == [(0, ids[9], 10), (ids[9], ids[19], 10), (ids[19], ids[24], 5)]
    assert all(s.channel is None for s in slices)
    jobs()
    assert statuses() == {"sent": 25}
    with organization_scope(org.id):
        assert db.session.get(Campaign, campaign.id).status == CampaignStatus.COMPLETED
        assert db.session.get(SendRequest, request.id).planned_count == 25
        per_recipient = db.session.execute(
            select(Delivery.recipient_id, func.count()).group_by(Delivery.recipient_id)
        ).all()
    assert sorted(r for r, _ in per_recipient) == ids and {n for _, n in per_recipient} == {1}
    live = assert_counters_match_ledger(org.id, StatScope.CAMPAIGN, campaign.id)
    assert live["targeted"] == live["queued"] == live["sent"] == 25


def test_a_slice_whose_worker_died_is_planned_again_once(org, audience, jobs, statuses, redis):
    _campaign, request = _launch(org)
    plan_send_request(request.id, org.id)
    first = _slices(org, request)[0]
    redis.flushdb()  # the jobs are gone
    with organization_scope(org.id):
        # A worker took the slice and died before its commit: running, heartbeat stale.
        db.session.execute(
            update(DeliveryBatch)
            .where(DeliveryBatch.id == first.id)
            .values(status=BatchStatus.RUNNING, heartbeat_at=datetime.now(UTC))
        )
        db.session.commit()
    assert statuses() == {}
    tick(datetime.now(UTC) + timedelta(minutes=5))
    jobs()
    assert statuses() == {"sent": 25}
    assert send_batch(first.id, org.id) == "nothing to do"  # a late duplicate job
    assert statuses() == {"sent": 25}


def test_in_app_items_are_stored_sent_and_published_by_planning(
    org, audience, jobs, statuses, redis
):
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(f"whistle:inbox:{org.id}:*")
    pubsub.get_message(timeout=1)
    with organization_scope(org.id):
        trigger("digest", to=["s01"], channels=["in_app"], data={"reason": "hi"}, actor=SYSTEM)
        request = db.session.scalar(select(SendRequest))
        planner.plan(request.id)  # no channel job: planning stored and published it
        delivery = db.session.scalar(select(Delivery))
        assert db.session.scalar(select(func.count()).select_from(DeliveryBatch)) == 0
    assert delivery.status == "sent" and delivery.attempts == 1 and delivery.sent_at is not None
    assert delivery.rendered == {"title": "Hello S1", "body": "hi"} and delivery.inbox_seq
    message = pubsub.get_message(timeout=2)
    pubsub.close()
    frame = json.loads(message["data"])
    assert frame["id"] == delivery.id and frame["seq"] == delivery.inbox_seq
    assert (frame["title"], frame["body"], frame["data"]) == ("Hello S1", "hi", {"reason": "hi"})


def test_a_template_error_goes_to_the_channel_job_which_records_it(
    org, make_template, make_recipient, jobs, statuses
):
    broken = {"in_app": {"title": "{{ recipient.attributes.plan.upper() }}", "body": "x"}}
    make_template(org, "plan", broken)
    make_recipient(org, "pro", attributes={"plan": "pro"})
    make_recipient(org, "none")
    with organization_scope(org.id):
        trigger("plan", to=["pro", "none"], channels=["in_app"], actor=SYSTEM)
    jobs()
    assert statuses() == {"sent": 1, "failed": 1}
    with organization_scope(org.id):
        failed = db.session.scalar(select(Delivery).where(Delivery.status == "failed"))
    assert failed.error.startswith("template error: in_app.title")


def test_a_rate_limited_in_app_provider_keeps_the_channel_jobs(org, audience, jobs, statuses):
    with organization_scope(org.id):
        provider = Provider(
            channel=Channel.IN_APP,
            kind=ProviderKind.IN_APP,
            name="Paced inbox",
            rate_limit_per_second=1000,
        )
        provider.set_credentials({})
        db.session.add(provider)
        db.session.commit()
    _campaign, request = _launch(org)
    plan_send_request(request.id, org.id)
    send_batch(_slices(org, request)[0].id, org.id)  # plans 10: queued for a paced channel job
    assert statuses() == {"queued": 10}
    jobs()
    assert statuses() == {"sent": 25}


def test_unsubscribe_links_in_in_app_items_name_their_delivery(
    org, app, make_template, make_recipient, jobs
):
    from whistle_web.tracking.links import verify_unsubscribe

    make_template(org, "u", {"in_app": {"title": "T", "body": "Stop: {{ unsubscribe_url }}"}})
    recipient = make_recipient(org, "r1")
    with organization_scope(org.id):
        trigger("u", to=["r1"], channels=["in_app"], actor=SYSTEM)
    jobs()
    with organization_scope(org.id):
        delivery = db.session.scalar(select(Delivery))
    assert delivery.status == "sent"
    token = delivery.rendered["body"].rsplit("/", 1)[-1]
    payload = verify_unsubscribe(token, secret=app.config["SECRET_KEY"])
    assert (payload.delivery_id, payload.recipient_id) == (delivery.id, recipient.id)


@pytest.mark.committed
def test_an_erasure_waits_for_a_planner_holding_the_recipient(
    app, org, make_template, make_recipient
):
    """The planner reads its recipients FOR KEY SHARE: an erasure (no foreign key from the
    ledger to check it) waits for the planner's commit, then anonymises what it wrote."""
    from whistle_web.recipients.services import erase_recipient

    make_template(org, "digest", CONTENT)
    recipient_id = make_recipient(org, "gone", name="Gone", email="g@example.com").id
    with organization_scope(org.id):
        trigger("digest", to=["gone"], channels=["in_app"], actor=SYSTEM)
        request_id = db.session.scalar(select(SendRequest.id))
    db.session.commit()
    written, release, erased = threading.Event(), threading.Event(), threading.Event()

    def plan() -> None:
        with app.app_context(), organization_scope(org.id):
            request = db.session.get(SendRequest, request_id)
            planner.Planner(request).plan_batch([recipient_id])
            written.set()
            release.wait(10)
            db.session.commit()

    def erase() -> None:
        with app.app_context(), organization_scope(org.id):
            erase_recipient(recipient_id, actor=SYSTEM)
            db.session.commit()
            erased.set()

    planning = threading.Thread(target=plan)
    planning.start()
    assert written.wait(10)
    erasing = threading.Thread(target=erase)
    erasing.start()
    assert not erased.wait(0.5)  # held by the planner's lock on the recipient
    release.set()
    planning.join(10)
    erasing.join(10)
    assert erased.is_set()
    with organization_scope(org.id):
        delivery = db.session.scalar(select(Delivery))
    assert delivery.status == "sent" and delivery.recipient_id is None
    assert delivery.rendered is None and delivery.address is None


def test_the_sweeper_closes_a_run_whose_last_job_died_before_closing_it(
    org, audience, statuses, redis
):
    campaign, request = _launch(org)
    plan_send_request(request.id, org.id)
    redis.flushdb()
    with organization_scope(org.id):
        for piece in _slices(org, request):
            # What a job does before its completion check, where the worker was killed.
            planner.plan_slice(db.session.get(DeliveryBatch, piece.id), request)
        assert db.session.get(Campaign, campaign.id).status == CampaignStatus.SENDING
    assert statuses() == {"sent": 25}
    assert tick(datetime.now(UTC) + timedelta(minutes=5))["completed"] == 1
    with organization_scope(org.id):
        db.session.expire_all()
        assert db.session.get(Campaign, campaign.id).status == CampaignStatus.COMPLETED
