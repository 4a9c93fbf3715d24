"""Scheduler ticks that keep the send path moving after anything goes wrong.

PostgreSQL is the source of truth; Redis (and every job in it) may vanish at any moment.
Each tick looks at what the database says is unfinished and makes sure a job exists for
it: due triggers, deferred deliveries whose time has come, planners and batches whose
job vanished or whose worker died.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from sqlalchemy import or_, select, text, update

from whistle_web import get_redis
from whistle_web.deliveries.dispatch import check_completion
from whistle_web.deliveries.ledger import CounterRow, bump_counters
from whistle_web.deliveries.models import BatchStatus, Delivery, DeliveryBatch
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.extensions import db
from whistle_web.notifications.models import Notification, SendRequest, SendRequestStatus
from whistle_web.tenancy import organization_scope, unscoped

log = logging.getLogger(__name__)

# A worker refreshes its batch's heartbeat after every chunk; this much silence means it died
# (WHISTLE_SWEEP_STALE_SECONDS overrides it).
STALE_AFTER = timedelta(seconds=120)


def _stale_after() -> timedelta:
    return _seconds("WHISTLE_SWEEP_STALE_SECONDS", STALE_AFTER)


def _grace() -> timedelta:
    return _seconds("WHISTLE_SWEEP_GRACE_SECONDS", GRACE)


def _seconds(key: str, default: timedelta) -> timedelta:
    from flask import current_app

    seconds = current_app.config.get(key)
    return timedelta(seconds=float(seconds)) if seconds else default


# Work this young may simply not have been enqueued yet by the process that created it.
GRACE = timedelta(seconds=30)
# A send whose time was "now" when it was created was enqueued by its creator.
IMMEDIATE = timedelta(seconds=2)
ALIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}


def job_alive(job_id: str, *, started_counts: bool = True) -> bool:
    """Whether the job is waiting or running (``started_counts=False``: only waiting).

    "Queued" is checked against the queue itself: a worker killed between taking a job off
    its queue and marking it started leaves it "queued" for ever, in no queue at all.
    """
    redis = get_redis()
    try:
        job = Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return False
    status = job.get_status()
    if status == JobStatus.STARTED:
        return started_counts
    if status == JobStatus.QUEUED:
        queue = Queue(job.origin, connection=redis)
        # Waiting, or just taken by a worker that has not marked it started yet.
        return any(
            redis.lpos(key, job_id) is not None for key in (queue.key, queue.intermediate_queue_key)
        )
    return status in ALIVE


def start_due_send_requests(now: datetime) -> int:
    """Enqueue planning for requests whose send time came, or whose planner vanished."""
    from workers.sending import enqueue_planning, planning_job_ids

    rows = db.session.scalars(
        unscoped(
            select(SendRequest)
            .where(
                SendRequest.status.in_([SendRequestStatus.PENDING, SendRequestStatus.PLANNING]),
                SendRequest.send_at <= now,
                or_(
                    SendRequest.heartbeat_at.is_(None),
                    SendRequest.heartbeat_at <= now - _stale_after(),
                ),
            )
            .order_by(SendRequest.send_at)
            .limit(500)
        )
    ).all()
    started = 0
    for request in rows:
        # An immediate send created moments ago was enqueued by its creator: leave it alone.
        young = request.created_at > now - _grace()
        immediate = request.send_at <= request.created_at + IMMEDIATE
        if young and immediate and request.heartbeat_at is None:
            continue
        if request.campaign_id is not None and _campaign_paused(request):
            continue
        # A planner whose heartbeat went stale died even if RQ still calls its job started.
        started_counts = request.heartbeat_at is None
        if not any(
            job_alive(job_id, started_counts=started_counts)
            for job_id in planning_job_ids(request.id)
        ):
            enqueue_planning(request)
            started += 1
    return started


def _campaign_paused(request: SendRequest) -> bool:
    from whistle_web.campaigns.models import Campaign, CampaignStatus

    status = db.session.scalar(
        unscoped(select(Campaign.status).where(Campaign.id == request.campaign_id))
    )
    return status in (CampaignStatus.PAUSED, CampaignStatus.CANCELLED)


def dispatch_deferred(now: datetime, limit: int = 20_000) -> int:
    """Put deliveries held by quiet hours or local-time sends into batches once they are due."""
    from workers.sending import enqueue_batches

    rows = db.session.execute(
        unscoped(
            select(
                Delivery.id,
                Delivery.organization_id,
                Delivery.channel,
                Delivery.campaign_id,
                Notification.send_request_id,
            )
            .join(Notification, Notification.id == Delivery.notification_id)
            .where(
                Delivery.status == DeliveryStatus.QUEUED,
                Delivery.batch_id.is_(None),
                Delivery.not_before <= now,
            )
            .order_by(Delivery.not_before)
            .limit(limit)
            .with_for_update(of=Delivery, skip_locked=True)
        )
    ).all()
    groups: dict[tuple[int, int, str, bool], list[int]] = defaultdict(list)
    for delivery_id, org_id, channel, campaign_id, request_id in rows:
        groups[(org_id, request_id, channel, campaign_id is not None)].append(delivery_id)
    created: list[tuple[int, int, bool]] = []
    for (org_id, request_id, channel, is_campaign), ids in groups.items():
        with organization_scope(org_id):
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                batch = DeliveryBatch(send_request_id=request_id, channel=channel, size=len(chunk))
                db.session.add(batch)
                db.session.flush()
                db.session.execute(
                    update(Delivery)
                    .where(Delivery.id.in_(chunk))
                    .values(batch_id=batch.id)
                    .execution_options(synchronize_session=False)
                )
                created.append((org_id, batch.id, is_campaign))
    db.session.commit()
    for org_id, batch_id, is_campaign in created:
        enqueue_batches([batch_id], campaign=is_campaign, organization_id=org_id)
    return len(created)


def sweep_batches(now: datetime) -> int:
    """Revive batches whose job vanished; settle what a dead worker left in ``sending``."""
    from workers.sending import batch_job_id, enqueue_batches

    batches = db.session.scalars(
        unscoped(
            select(DeliveryBatch)
            .where(
                DeliveryBatch.status != BatchStatus.DONE,
                DeliveryBatch.created_at <= now - _grace(),
                or_(
                    DeliveryBatch.heartbeat_at.is_(None),
                    DeliveryBatch.heartbeat_at <= now - _stale_after(),
                ),
            )
            .order_by(DeliveryBatch.id)
            .limit(1000)
        )
    ).all()
    revived = 0
    for batch in batches:
        running_dead = batch.status == BatchStatus.RUNNING
        # A job that started marks its batch running at once; a batch still pending whose
        # job says "started" lost its worker in between (killed right after dequeuing), and
        # RQ keeps calling that job started until its own timeout: revive the batch now.
        if not running_dead and job_alive(batch_job_id(batch.id), started_counts=False):
            continue
        with organization_scope(batch.organization_id):
            if batch.channel is None:
                # A planning slice commits all of its work at once: plan it (again).
                batch.status = BatchStatus.PENDING
                batch.heartbeat_at = now  # not swept again before STALE_AFTER
                is_campaign = db.session.get(SendRequest, batch.send_request_id).campaign_id
                db.session.commit()
                enqueue_batches([batch.id], campaign=is_campaign is not None)
                revived += 1
                continue
            if running_dead:
                _fail_interrupted(batch, now)
            due = db.session.scalar(
                select(Delivery.id)
                .where(
                    Delivery.batch_id == batch.id,
                    Delivery.status == DeliveryStatus.QUEUED,
                    or_(Delivery.not_before.is_(None), Delivery.not_before <= now),
                )
                .limit(1)
            )
            waiting = db.session.scalar(
                select(Delivery.id)
                .where(Delivery.batch_id == batch.id, Delivery.status == DeliveryStatus.QUEUED)
                .limit(1)
            )
            if waiting is None:
                batch.status = BatchStatus.DONE
                batch.finished_at = now
            else:
                batch.status = BatchStatus.PENDING
                batch.heartbeat_at = now  # not swept again before STALE_AFTER
            request_id, is_campaign = batch.send_request_id, None
            db.session.commit()
            if due is not None:
                request = db.session.get(SendRequest, request_id)
                is_campaign = request.campaign_id is not None
                enqueue_batches([batch.id], campaign=is_campaign)
                revived += 1
            elif waiting is None:
                check_completion(request_id)
    return revived


def _fail_interrupted(batch: DeliveryBatch, now: datetime) -> None:
    """A worker died holding these: they may or may not have gone out, so never resend."""
    from whistle_web.deliveries.failures import FailureReason

    rows = db.session.execute(
        text(
            "UPDATE deliveries SET status = 'failed', failed_at = :now, updated_at = :now,"
            " error = 'the worker stopped while sending; not retried to avoid a duplicate',"
            " failure_reason = :reason"
            " WHERE batch_id = :batch AND organization_id = :org AND status = 'sending'"
            " RETURNING campaign_id, template_id, channel"
        ),
        {
            "now": now,
            "batch": batch.id,
            "org": batch.organization_id,
            "reason": FailureReason.INTERRUPTED.value,
        },
    ).all()
    if rows:
        log.warning(
            "batch %s: %d deliveries interrupted mid-send marked failed", batch.id, len(rows)
        )
    metric = f"failed:{FailureReason.INTERRUPTED}"
    bump_counters(
        CounterRow(c, t, ch, name, now) for c, t, ch in rows for name in ("failed", metric)
    )


def complete_finished_campaigns(now: datetime) -> int:
    """Close campaign runs whose work is all done but whose last job died before closing
    them (a worker killed between a batch's or a slice's commit and its completion check).
    """
    from whistle_web.campaigns.models import Campaign, CampaignStatus

    open_work = (
        select(DeliveryBatch.id)
        .where(
            DeliveryBatch.send_request_id == SendRequest.id,
            DeliveryBatch.status != BatchStatus.DONE,
        )
        .exists()
    )
    rows = db.session.execute(
        unscoped(
            select(SendRequest.id, SendRequest.organization_id)
            .join(Campaign, Campaign.id == SendRequest.campaign_id)
            .where(
                Campaign.status == CampaignStatus.SENDING,
                SendRequest.status.in_([SendRequestStatus.PLANNED, SendRequestStatus.CANCELLED]),
                SendRequest.created_at <= now - _grace(),
                ~open_work,
            )
            .limit(100)
        )
    ).all()
    db.session.commit()
    closed = 0
    for request_id, org_id in rows:
        with organization_scope(org_id):
            check_completion(request_id)
            closed += 1
    return closed


def tick(now: datetime | None = None) -> dict[str, int]:
    """One scheduler tick: launch due campaigns and sends, release deferred work, sweep."""
    from whistle_web.campaigns.services import launch_due_campaigns

    now = now or datetime.now(UTC)
    return {
        "campaigns": len(launch_due_campaigns(now)),
        "requests": start_due_send_requests(now),
        "deferred": dispatch_deferred(now),
        "revived": sweep_batches(now),
        "completed": complete_finished_campaigns(now),
    }
