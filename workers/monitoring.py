"""What the queues, workers and scheduler are doing, for the console's operations page.

Queues, workers and the periodic jobs are shared by every organization of the install;
jobs themselves belong to one: the send-path jobs take ``(id, organization_id)``
(:mod:`workers.sending`), so a job is an organization's when its second argument (or an
``organization_id`` keyword) is that organization's id. Failed jobs are only ever listed or
retried for the organization they belong to.

Jobs per second come from the rq workers' own counters (each worker keeps
``successful_job_count`` and ``failed_job_count`` in its Redis hash): every look at the
page stores a sample of those counters per worker in a short Redis list, and the rate is
the growth per worker between the oldest sample of the last few minutes and now. Counting
per worker makes a restarted worker (whose counters start again from zero) harmless.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import (
    FailedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.results import Result

from workers.queues import QUEUES

SAMPLES_KEY = "whistle:ops:job-samples"
SAMPLE_WINDOW_SECONDS = 300
MIN_SAMPLE_SPAN_SECONDS = 3
MAX_FAILED_SCANNED = 1000
MAX_EXC_LINES = 6
JOB_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")


@dataclass(frozen=True)
class QueueHealth:
    name: str
    queued: int
    started: int
    failed: int
    scheduled: int


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    state: str
    queues: list[str]
    last_heartbeat: datetime | None
    current_job: str | None
    successful: int
    failed: int
    seconds_since_heartbeat: float | None


@dataclass(frozen=True)
class FailedJob:
    id: str
    queue: str
    func: str
    description: str
    args: list[Any]
    failed_at: datetime | None
    error: str
    error_lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PeriodicItem:
    id: str
    func: str
    queue: str
    next_run: datetime | None
    interval_seconds: int | None


def queue_health(connection: Redis) -> list[QueueHealth]:
    """Depth and registry sizes of each Whistle queue, highest priority first."""
    rows = []
    for name in QUEUES:
        queue = Queue(name, connection=connection)
        rows.append(
            QueueHealth(
                name=name,
                queued=queue.count,
                started=StartedJobRegistry(queue=queue).count,
                failed=FailedJobRegistry(queue=queue).count,
                scheduled=ScheduledJobRegistry(queue=queue).count,
            )
        )
    return rows


def workers(connection: Redis) -> list[WorkerInfo]:
    """The rq workers registered in Redis (a dead one drops out when its key expires)."""
    now = datetime.now(UTC)
    found = []
    for worker in Worker.all(connection=connection):
        beat = worker.last_heartbeat
        if beat is not None and beat.tzinfo is None:
            beat = beat.replace(tzinfo=UTC)
        found.append(
            WorkerInfo(
                name=worker.name,
                state=str(worker.get_state()),
                queues=worker.queue_names(),
                last_heartbeat=beat,
                current_job=worker.get_current_job_id(),
                successful=worker.successful_job_count,
                failed=worker.failed_job_count,
                seconds_since_heartbeat=None if beat is None else (now - beat).total_seconds(),
            )
        )
    return sorted(found, key=lambda w: w.name)


def jobs_per_second(
    connection: Redis, found: list[WorkerInfo], now: float | None = None
) -> float | None:
    """Jobs finished per second across all workers recently; None until two samples exist.

    Stores the current sample (see the module docstring).
    """
    now = time.time() if now is None else now
    sample = {"t": now, "w": {w.name: w.successful + w.failed for w in found}}
    pipe = connection.pipeline()
    pipe.lpush(SAMPLES_KEY, json.dumps(sample))
    pipe.ltrim(SAMPLES_KEY, 0, 199)
    pipe.expire(SAMPLES_KEY, SAMPLE_WINDOW_SECONDS * 2)
    pipe.lrange(SAMPLES_KEY, 0, -1)
    raw = pipe.execute()[-1]
    oldest = None
    for item in raw:
        try:
            earlier = json.loads(item)
            stamp = float(earlier["t"])
        except (ValueError, KeyError, TypeError):
            continue
        in_window = now - SAMPLE_WINDOW_SECONDS <= stamp <= now - MIN_SAMPLE_SPAN_SECONDS
        if in_window and (oldest is None or stamp < oldest["t"]):
            oldest = earlier
    if oldest is None:
        return None
    done = 0
    for name, count in sample["w"].items():
        before = oldest["w"].get(name)
        if isinstance(before, int) and count >= before:
            done += count - before
    return done / (now - float(oldest["t"]))


def job_organization(job: Job) -> int | None:
    """The organization a job works for, when its arguments say so."""
    try:
        kwargs = job.kwargs or {}
        if isinstance(kwargs.get("organization_id"), int):
            return int(kwargs["organization_id"])
        args = job.args or ()
        if len(args) >= 2 and isinstance(args[1], int) and not isinstance(args[1], bool):
            return int(args[1])
    except Exception:  # an undecodable job belongs to nobody we can show
        return None
    return None


def _error_of(job: Job) -> str:
    result = job.latest_result()
    if result is not None and result.type == Result.Type.FAILED:
        return result.exc_string or ""
    return ""


def failed_jobs(connection: Redis, organization_id: int, limit: int = 100) -> list[FailedJob]:
    """The organization's failed jobs, most recently failed first."""
    found = []
    for name in QUEUES:
        registry = FailedJobRegistry(queue=Queue(name, connection=connection))
        ids = registry.get_job_ids(0, MAX_FAILED_SCANNED - 1, desc=True)
        for job in Job.fetch_many(ids, connection=connection):
            if job is None or job_organization(job) != organization_id:
                continue
            error = _error_of(job).strip()
            lines = error.splitlines()
            found.append(
                FailedJob(
                    id=job.id,
                    queue=name,
                    func=job.func_name or "",
                    description=job.description or "",
                    args=list(job.args or ()),
                    failed_at=_aware(job.ended_at),
                    error=lines[-1] if lines else "",
                    error_lines=lines[:MAX_EXC_LINES],
                )
            )
    found.sort(key=lambda j: j.failed_at or datetime.min.replace(tzinfo=UTC), reverse=True)
    return found[:limit]


def retry_failed_job(connection: Redis, job_id: str, organization_id: int) -> Job | None:
    """Put the organization's failed job back on its queue; None when there is no such job."""
    if not JOB_ID.match(job_id):
        return None
    for name in QUEUES:
        registry = FailedJobRegistry(queue=Queue(name, connection=connection))
        if connection.zscore(registry.key, job_id) is None:
            continue
        job = Job.fetch_many([job_id], connection=connection)[0]
        if job is None or job_organization(job) != organization_id:
            return None
        return registry.requeue(job)
    return None


def periodic_jobs(connection: Redis, organization_id: int) -> list[PeriodicItem]:
    """The jobs rq-scheduler holds, next run first: the install's periodic ticks and this
    organization's own (another organization's are left out)."""
    from rq_scheduler import Scheduler

    scheduler = Scheduler(connection=connection)
    items = []
    for job, when in scheduler.get_jobs(with_times=True):
        if job_organization(job) not in (None, organization_id):
            continue
        meta = job.meta or {}
        items.append(
            PeriodicItem(
                id=job.id,
                func=job.func_name or "",
                queue=str(job.origin or meta.get("queue_name") or ""),
                next_run=_aware(when),
                interval_seconds=meta.get("interval"),
            )
        )
    return items


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)
