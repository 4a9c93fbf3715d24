"""The periodic jobs the ``scheduler`` process keeps registered with rq-scheduler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from redis import Redis
from rq_scheduler import Scheduler

from workers import maintenance
from workers.queues import HIGH, LOW


@dataclass(frozen=True)
class PeriodicJob:
    id: str
    func: Callable[..., object]
    interval_seconds: int
    queue: str


PERIODIC_JOBS: tuple[PeriodicJob, ...] = (
    PeriodicJob("whistle-heartbeat", maintenance.record_scheduler_heartbeat, 60, LOW),
    PeriodicJob("whistle-tick", maintenance.run_tick, 10, HIGH),
    PeriodicJob("whistle-retention", maintenance.run_retention, 3600, LOW),
)


def register_periodic_jobs(
    scheduler: Scheduler, jobs: tuple[PeriodicJob, ...] = PERIODIC_JOBS
) -> None:
    """Replace any earlier registration of our jobs (their code or interval may have changed)."""
    wanted = {job.id for job in jobs}
    for existing in scheduler.get_jobs():
        if existing.id in wanted:
            scheduler.cancel(existing)
    for job in jobs:
        scheduler.schedule(
            scheduled_time=datetime.now(UTC),
            func=job.func,
            interval=job.interval_seconds,
            repeat=None,
            id=job.id,
            queue_name=job.queue,
            result_ttl=job.interval_seconds * 2,
        )


class WhistleScheduler(Scheduler):
    """rq-scheduler that puts Whistle's periodic jobs back if Redis lost them (FLUSHALL)."""

    def enqueue_jobs(self):  # type: ignore[no-untyped-def]
        key = self.scheduled_jobs_key
        if any(self.connection.zscore(key, job.id) is None for job in PERIODIC_JOBS):
            register_periodic_jobs(self)
        return super().enqueue_jobs()


def make_scheduler(connection: Redis, interval: int = 5) -> Scheduler:
    return WhistleScheduler(queue_name=LOW, connection=connection, interval=interval)
