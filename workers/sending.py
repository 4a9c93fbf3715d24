"""Jobs of the send path. Each takes ids (never objects) and runs in its organization's scope."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from rq import Queue
from rq.job import Job

from whistle_web import get_redis
from whistle_web.deliveries import dispatch, planner
from whistle_web.notifications.models import SendRequest, SendRequestKind
from whistle_web.tenancy import organization_scope
from workers.queues import DEFAULT, HIGH

log = logging.getLogger(__name__)

JOB_TIMEOUT = 3600
FAILURE_TTL = 7 * 24 * 3600


def plan_send_request(send_request_id: int, organization_id: int) -> str:
    """Plan a send request to the end (or until its campaign is paused)."""
    with organization_scope(organization_id):
        planned = planner.plan(send_request_id, run_inline=_send_now)
        if planned.campaign_run:
            dispatch.check_completion(send_request_id)
    return f"{len(planned.batch_ids)} batches"


def _send_now(batch_ids: list[int]) -> None:
    """A small trigger's batches, sent by its planning job (see planner.plan)."""
    for batch_id in batch_ids:
        dispatch.run_batch(batch_id)


def send_batch(batch_id: int, organization_id: int) -> str:
    """Send what is due in one channel batch."""
    with organization_scope(organization_id):
        return dispatch.run_batch(batch_id)


def planning_job_id(send_request_id: int) -> str:
    return f"plan-{send_request_id}"


def batch_job_id(batch_id: int) -> str:
    return f"batch-{batch_id}"


def enqueue_planning(request: SendRequest) -> Job:
    """Enqueue the planning job of one send request in one Redis round trip."""
    (job,) = enqueue_plannings([(request.id, request.organization_id)], kind=request.kind)
    return job


def enqueue_plannings(requests: Sequence[tuple[int, int]], *, kind: SendRequestKind) -> list[Job]:
    """Enqueue the planning jobs of send requests given as (id, organization id), all in
    one Redis round trip (``enqueue`` takes two per job)."""
    queue = Queue(HIGH if kind == SendRequestKind.TRIGGER else DEFAULT, connection=get_redis())
    return queue.enqueue_many(
        [
            Queue.prepare_data(
                plan_send_request,
                args=(request_id, organization_id),
                job_id=planning_job_id(request_id),
                timeout=JOB_TIMEOUT,
                failure_ttl=FAILURE_TTL,
                result_ttl=3600,
                description=f"plan send request {request_id}",
            )
            for request_id, organization_id in requests
        ]
    )


def enqueue_batches(
    batch_ids: Iterable[int], *, campaign: bool, organization_id: int | None = None
) -> list[Job]:
    """Enqueue one job per batch in a single Redis round trip."""
    from whistle_web.tenancy import require_organization_id

    org_id = organization_id if organization_id is not None else require_organization_id()
    queue = Queue(DEFAULT if campaign else HIGH, connection=get_redis())
    jobs = [
        Queue.prepare_data(
            send_batch,
            args=(batch_id, org_id),
            job_id=batch_job_id(batch_id),
            timeout=JOB_TIMEOUT,
            failure_ttl=FAILURE_TTL,
            result_ttl=3600,
            description=f"send batch {batch_id}",
        )
        for batch_id in batch_ids
    ]
    if not jobs:
        return []
    log.debug("enqueued %d batches at %s", len(jobs), datetime.now(UTC).isoformat())
    return queue.enqueue_many(jobs)
