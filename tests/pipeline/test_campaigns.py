"""Campaigns: snapshot at launch, pause within a batch, resume exactly, cancel, cron, Redis loss."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, assert_counters_match_ledger
from whistle_web.campaigns.models import AudienceType, Campaign, CampaignStatus
from whistle_web.campaigns.services import (
    cancel_campaign,
    create_campaign,
    delete_campaign,
    launch_campaign,
    pause_campaign,
    resume_campaign,
    update_campaign,
)
from whistle_web.deliveries import planner
from whistle_web.deliveries.models import Delivery, DeliveryBatch, StatScope
from whistle_web.deliveries.sweeper import tick
from whistle_web.errors import InvalidState, ValidationError
from whistle_web.extensions import db
from whistle_web.models import AuditLog, SendRequest
from whistle_web.tenancy import organization_scope
from workers.sending import plan_send_request, send_batch

pytestmark = pytest.mark.usefixtures("small_batches")


@pytest.fixture
def audience(org, make_recipient, make_template):
    make_template(org, "digest", CONTENT)
    return [
        make_recipient(org, f"c{i:02d}", name=f"C{i}", email=f"c{i:02d}@example.com")
        for i in range(25)
    ]


def _campaign(org, **kwargs):
    with organization_scope(org.id):
        return create_campaign(
            "November digest",
            template_key="digest",
            channels=kwargs.pop("channels", ["in_app"]),
            audience_type=kwargs.pop("audience_type", AudienceType.ALL),
            actor=SYSTEM,
            **kwargs,
        )


def _request(org, campaign):
    with organization_scope(org.id):
        return db.session.scalar(select(SendRequest).where(SendRequest.campaign_id == campaign.id))


def _batches(org, request):
    with organization_scope(org.id):
        return list(
            db.session.scalars(
                select(DeliveryBatch.id)
                .where(DeliveryBatch.send_request_id == request.id)
                .order_by(DeliveryBatch.id)
            )
        )


def test_launch_snapshots_the_audience(org, audience, make_recipient, jobs, statuses, redis):
    campaign = _campaign(org)
    with organization_scope(org.id):
        launch_campaign(campaign.id, actor=SYSTEM)
    make_recipient(org, "late-comer")  # created after launch: not in this campaign
    jobs()
    assert statuses() == {"sent": 25}
    with organization_scope(org.id):
        db.session.refresh(campaign)
        assert campaign.status == CampaignStatus.COMPLETED and campaign.completed_at is not None
    counts = assert_counters_match_ledger(org.id, StatScope.CAMPAIGN, campaign.id)
    assert counts["targeted"] == 25 and counts["sent"] == 25


def test_pause_stops_within_a_batch_and_resume_continues_exactly(
    org, audience, jobs, statuses, redis
):
    campaign = _campaign(org)
    with organization_scope(org.id):
        launch_campaign(campaign.id, actor=SYSTEM)
    request = _request(org, campaign)
    plan_send_request(request.id, org.id)  # three planning slices of at most 10
    slices = _batches(org, request)
    assert len(slices) == 3
    # A slice plans its recipients and writes their in-app items sent at once.
    assert send_batch(slices[0], org.id).startswith("planned 10 recipients")
    assert statuses() == {"sent": 10}
    with organization_scope(org.id):
        pause_campaign(campaign.id, actor=SYSTEM)
        with pytest.raises(InvalidState):
            pause_campaign(campaign.id, actor=SYSTEM)
    jobs()  # the queued slice jobs find the campaign paused and plan nothing
    assert statuses() == {"sent": 10}
    with organization_scope(org.id):
        resume_campaign(campaign.id, actor=SYSTEM)
    jobs()
    assert statuses() == {"sent": 25}
    with organization_scope(org.id):
        per_recipient = db.session.execute(
            select(Delivery.recipient_id, func.count()).group_by(Delivery.recipient_id)
        ).all()
        assert all(n == 1 for _, n in per_recipient) and len(per_recipient) == 25
        db.session.refresh(campaign)
        assert campaign.status == CampaignStatus.COMPLETED


def test_pause_during_planning_resumes_from_the_cursor(org, audience, jobs, statuses, redis):
    campaign = _campaign(org)
    with organization_scope(org.id):
        launch_campaign(campaign.id, actor=SYSTEM)
        request = _request(org, campaign)
        planner.plan(request.id, max_batches=1)  # one slice cut, the cursor after it
        pause_campaign(campaign.id, actor=SYSTEM)
    jobs()  # the first slice's job finds the campaign paused
    assert statuses() == {}
    with organization_scope(org.id):
        resume_campaign(campaign.id, actor=SYSTEM)
    jobs()
    assert statuses() == {"sent": 25}


def test_cancel_marks_the_rest_cancelled(org, audience, jobs, statuses, redis):
    campaign = _campaign(org, channels=["in_app", "email"])
    with organization_scope(org.id):
        launch_campaign(campaign.id, actor=SYSTEM)
    request = _request(org, campaign)
    plan_send_request(request.id, org.id)
    # The first slice sends its in-app items and queues its emails (not sent yet).
    send_batch(_batches(org, request)[0], org.id)
    with organization_scope(org.id):
        cancel_campaign(campaign.id, actor=SYSTEM)
        with pytest.raises(InvalidState):
            resume_campaign(campaign.id, actor=SYSTEM)
    jobs()
    # The queued emails are cancelled; the slices not planned yet never target anyone.
    assert statuses() == {"sent": 10, "cancelled": 10}
    counts = assert_counters_match_ledger(org.id, StatScope.CAMPAIGN, campaign.id)
    assert counts["targeted"] == 20 and counts["cancelled"] == 10


def _time_passes(org, campaign):
    """Move the campaign's next run into the past, as if its time had come."""
    with organization_scope(org.id):
        db.session.refresh(campaign)
        campaign.next_run_at = datetime.now(UTC) - timedelta(seconds=1)
        db.session.commit()


def test_a_future_campaign_waits_for_the_tick(org, audience, jobs, statuses, redis):
    campaign = _campaign(org, send_at=datetime.now(UTC) + timedelta(hours=2))
    with organization_scope(org.id):
        launch_campaign(campaign.id, actor=SYSTEM)
        assert campaign.status == CampaignStatus.SCHEDULED
    tick()
    assert jobs() == 0
    _time_passes(org, campaign)
    tick()
    jobs()
    assert statuses() == {"sent": 25}


def test_recurring_campaigns_run_on_their_cron(org, audience, jobs, statuses, redis):
    berlin = ZoneInfo("Europe/Berlin")
    campaign = _campaign(org, cron="0 9 * * *", cron_timezone="Europe/Berlin")
    with organization_scope(org.id):
        launch_campaign(campaign.id, actor=SYSTEM)
    local = campaign.next_run_at.astimezone(berlin)
    assert (local.hour, local.minute) == (9, 0) and campaign.next_run_at > datetime.now(UTC)
    _time_passes(org, campaign)
    tick()
    jobs()
    assert statuses() == {"sent": 25}
    with organization_scope(org.id):
        db.session.refresh(campaign)
        assert campaign.status == CampaignStatus.SCHEDULED  # waiting for the next run
        following = campaign.next_run_at.astimezone(berlin)
        assert (following.hour, following.minute) == (9, 0)
        assert timedelta(0) < campaign.next_run_at - datetime.now(UTC) <= timedelta(days=1)
    _time_passes(org, campaign)
    tick()
    jobs()
    assert statuses() == {"sent": 50}  # a second run, to the same audience


def test_bad_campaigns_name_the_field(org, audience):
    with organization_scope(org.id), pytest.raises(ValidationError) as error:
        create_campaign(
            "",
            template_key="nope",
            channels=[],
            audience_type="segment",
            cron="every tuesday",
            actor=SYSTEM,
        )
    fields = {e.field for e in error.value.errors}
    assert fields == {"name", "template", "segment", "cron", "channels"}


def test_redis_flushed_mid_send_loses_nothing(org, audience, jobs, statuses, redis):
    campaign = _campaign(org)
    with organization_scope(org.id):
        launch_campaign(campaign.id, actor=SYSTEM)
    request = _request(org, campaign)
    plan_send_request(request.id, org.id)
    send_batch(_batches(org, request)[0], org.id)
    redis.flushdb()  # every queued job is gone
    assert jobs() == 0
    assert statuses() == {"sent": 10}
    tick(datetime.now(UTC) + timedelta(minutes=5))  # the sweeper finds the orphaned slices
    jobs()
    assert statuses() == {"sent": 25}
    with organization_scope(org.id):
        db.session.refresh(campaign)
        assert campaign.status == CampaignStatus.COMPLETED


def test_other_organizations_cannot_touch_a_campaign(org, other_org, audience):
    from whistle_web.errors import NotFound

    campaign = _campaign(org)
    with organization_scope(other_org.id):
        for action in (launch_campaign, pause_campaign, resume_campaign, cancel_campaign):
            with pytest.raises(NotFound):
                action(campaign.id, actor=SYSTEM)
    with organization_scope(org.id):
        assert db.session.get(Campaign, campaign.id).status == CampaignStatus.DRAFT


def test_editing_a_draft_changes_only_what_is_given_and_audits_it(org, audience, make_template):
    make_template(org, "other", CONTENT)
    campaign = _campaign(org)
    with organization_scope(org.id):
        edited = update_campaign(
            campaign.id,
            {
                "name": "  December digest ",
                "template_key": "other",
                "audience_type": AudienceType.LIST,
                "external_ids": ["c01", "c02", "c01"],
            },
            actor=SYSTEM,
        )
        assert edited.name == "December digest"
        assert edited.audience_type == AudienceType.LIST
        assert edited.audience_external_ids == ["c01", "c02"]
        assert edited.channels == ["in_app"]  # untouched
        audit = db.session.scalar(
            select(AuditLog).where(AuditLog.action == "campaign.updated").order_by(AuditLog.id)
        )
        assert audit.changes == {
            "fields": ["audience_external_ids", "audience_type", "name", "template_id"]
        }


def test_editing_reports_every_bad_field_and_changes_nothing(org, audience):
    campaign = _campaign(org)
    with organization_scope(org.id):
        with pytest.raises(ValidationError) as caught:
            update_campaign(
                campaign.id,
                {
                    "name": " ",
                    "template_key": "missing",
                    "audience_type": AudienceType.TOPIC,
                    "topic_key": "nope",
                    "cron": "every day",
                    "cron_timezone": "Mars/Olympus",
                },
                actor=SYSTEM,
            )
        fields = {e.field for e in caught.value.errors}
        assert fields == {"name", "template", "topic", "cron", "cron_timezone"}
        db.session.rollback()
        assert db.session.get(Campaign, campaign.id).name == "November digest"


def test_a_sent_campaign_can_be_neither_edited_nor_deleted(org, audience, jobs):
    campaign = _campaign(org)
    draft = _campaign(org)
    with organization_scope(org.id):
        launch_campaign(campaign.id, actor=SYSTEM)
    jobs()
    with organization_scope(org.id):
        with pytest.raises(InvalidState):
            update_campaign(campaign.id, {"name": "x"}, actor=SYSTEM)
        with pytest.raises(InvalidState):
            delete_campaign(campaign.id, actor=SYSTEM)
        delete_campaign(draft.id, actor=SYSTEM)
        assert db.session.get(Campaign, draft.id) is None
        assert db.session.get(Campaign, campaign.id) is not None


def test_a_job_taken_by_a_worker_killed_before_it_started_is_revived(
    org, audience, jobs, statuses, redis
):
    """kill -9 between a worker taking a job off its queue and marking it started leaves
    the job "queued" in no queue: the sweeper must not wait for it."""
    from rq import Queue

    from workers.queues import DEFAULT
    from workers.sending import batch_job_id

    campaign = _campaign(org)
    with organization_scope(org.id):
        launch_campaign(campaign.id, actor=SYSTEM)
    request = _request(org, campaign)
    plan_send_request(request.id, org.id)
    queue = Queue(DEFAULT, connection=redis)
    taken = queue.job_ids
    assert {batch_job_id(b) for b in _batches(org, request)} <= set(taken)
    for job_id in taken:  # what the killed worker did: the ids left the queue, nothing else
        queue.remove(job_id)
    assert queue.count == 0
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert tick(later)["revived"] == len(_batches(org, request))
    jobs()
    assert statuses() == {"sent": 25}
    with organization_scope(org.id):
        db.session.refresh(campaign)
        assert campaign.status == CampaignStatus.COMPLETED
