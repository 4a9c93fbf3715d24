"""Jobs of the send path. Each takes ids (never objects) and runs in its organization's scope."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from rq import Queue
from rq.job import Job
from rq.timeouts import BaseTimeoutException

from whistle_web import get_redis
from whistle_web.deliveries import dispatch, planner
from whistle_web.extensions import db
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


class PlanningFailed(Exception):
    """Some send requests of a planning group could not be planned (each one is logged)."""


def plan_send_requests(requests: list[tuple[int, int]]) -> str:
    """Plan the send requests of triggers written together, given as (id, organization id).

    One job for what a web process wrote in one statement (see :func:`enqueue_plannings`):
    RQ's own work per job (dequeue, registries, heartbeats, result: ~15 Redis commands and 4
    transactions) is then paid once for the group. Each request is planned exactly as
    :func:`plan_send_request` plans it, in its own organization's scope and transactions,
    in the order written. One that fails is logged and rolled back and the others go on;
    the job then fails naming it, and the sweeper enqueues its planning on its own after
    its grace period, as it does for a failed single planning job.
    """
    failed: list[int] = []
    for request_id, organization_id in requests:
        try:
            plan_send_request(request_id, organization_id)
        except BaseTimeoutException:
            raise
        except Exception:
            log.exception("planning send request %s failed", request_id)
            db.session.rollback()
            failed.append(request_id)
    if failed:
        raise PlanningFailed(f"send requests {failed} of {len(requests)} could not be planned")
    return f"{len(requests)} send requests"


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


# A send request planned by a group's job: the key names that job, for the sweeper (which
# looks planning up by send request). Kept as long as a queued job may reasonably wait.
GROUP_ALIAS_TTL = 24 * 3600


def planning_alias_key(send_request_id: int) -> str:
    return f"whistle:planning:{send_request_id}"


def planning_job_ids(send_request_id: int) -> list[str]:
    """The jobs that may be planning a send request: its group's (if it was enqueued in
    one) and its own (enqueued alone, by its creator or by the sweeper)."""
    group = get_redis().get(planning_alias_key(send_request_id))
    own = planning_job_id(send_request_id)
    return [group.decode(), own] if group else [own]


def batch_job_id(batch_id: int) -> str:
    return f"batch-{batch_id}"


def _job(func: Any, args: tuple[Any, ...], job_id: str, description: str) -> Any:
    """A send-path job, for ``Queue.enqueue_many``: kept an hour once done, a week failed."""
    return Queue.prepare_data(
        func,
        args=args,
        job_id=job_id,
        timeout=JOB_TIMEOUT,
        failure_ttl=FAILURE_TTL,
        result_ttl=3600,
        description=description,
    )


def enqueue_planning(request: SendRequest) -> Job:
    """Enqueue the planning job of one send request in one Redis round trip."""
    (job,) = enqueue_plannings([(request.id, request.organization_id)], kind=request.kind)
    return job


def enqueue_plannings(
    requests: Sequence[tuple[int, int]],
    *,
    kind: SendRequestKind,
    together: Sequence[tuple[int, int]] = (),
) -> list[Job]:
    """Enqueue the planning of send requests given as (id, organization id), all in one
    Redis round trip (``enqueue`` takes two per job).

    Each of ``requests`` gets a job of its own. ``together`` (small triggers a web process
    wrote in one statement) are planned by one job, :func:`plan_send_requests`, whose id
    each one's alias key names for the sweeper; one alone gets a job of its own too.
    """
    redis = get_redis()
    queue = Queue(HIGH if kind == SendRequestKind.TRIGGER else DEFAULT, connection=redis)
    jobs = [
        _job(
            plan_send_request,
            (request_id, organization_id),
            planning_job_id(request_id),
            f"plan send request {request_id}",
        )
        for request_id, organization_id in (
            [*requests, *together] if len(together) == 1 else requests
        )
    ]
    group_id = f"plan-group-{together[0][0]}" if len(together) > 1 else None
    if group_id is not None:
        jobs.append(
            _job(
                plan_send_requests,
                ([(request_id, org_id) for request_id, org_id in together],),
                group_id,
                f"plan send requests {[r for r, _ in together]}",
            )
        )
    if not jobs:
        return []
    with redis.pipeline() as pipe:
        enqueued = queue.enqueue_many(jobs, pipeline=pipe)
        if group_id is not None:
            for request_id, _ in together:
                pipe.set(planning_alias_key(request_id), group_id, ex=GROUP_ALIAS_TTL)
        pipe.execute()
    return enqueued


def enqueue_batches(
    batch_ids: Iterable[int], *, campaign: bool, organization_id: int | None = None
) -> list[Job]:
    """Enqueue one job per batch in a single Redis round trip."""
    from whistle_web.tenancy import require_organization_id

    org_id = organization_id if organization_id is not None else require_organization_id()
    queue = Queue(DEFAULT if campaign else HIGH, connection=get_redis())
    jobs = [
        _job(send_batch, (batch_id, org_id), batch_job_id(batch_id), f"send batch {batch_id}")
        for batch_id in batch_ids
    ]
    if not jobs:
        return []
    log.debug("enqueued %d batches at %s", len(jobs), datetime.now(UTC).isoformat())
    return queue.enqueue_many(jobs)
