"""The scheduler registers Whistle's periodic jobs and real RQ workers run them."""

from __future__ import annotations

from rq import Queue

from workers.maintenance import SCHEDULER_HEARTBEAT_KEY
from workers.queues import QUEUES
from workers.schedule import PERIODIC_JOBS, make_scheduler, register_periodic_jobs


def test_registration_is_idempotent(redis):
    scheduler = make_scheduler(redis)
    register_periodic_jobs(scheduler)
    register_periodic_jobs(scheduler)  # a restarted scheduler process replaces, not duplicates
    ids = sorted(job.id for job in scheduler.get_jobs())
    assert ids == sorted(job.id for job in PERIODIC_JOBS)


def test_due_jobs_reach_a_worker_and_run(redis, runner):
    scheduler = make_scheduler(redis)
    register_periodic_jobs(scheduler)
    scheduler.run(burst=True)  # enqueues what is due now
    queued = sum(Queue(name, connection=redis).count for name in QUEUES)
    assert queued == len(PERIODIC_JOBS)

    result = runner.invoke(args=["whistle", "worker", "--burst", "--simple"])
    assert result.exit_code == 0, result.output
    assert redis.get(SCHEDULER_HEARTBEAT_KEY) is not None
    assert all(Queue(name, connection=redis).count == 0 for name in QUEUES)
    # Periodic jobs stay registered for their next run.
    assert len(list(scheduler.get_jobs())) == len(PERIODIC_JOBS)


def test_the_scheduler_puts_its_jobs_back_after_redis_lost_them(redis):
    scheduler = make_scheduler(redis)
    register_periodic_jobs(scheduler)
    redis.flushdb()  # what FLUSHALL or a Redis restart without persistence does
    scheduler.enqueue_jobs()
    assert sorted(j.id for j in scheduler.get_jobs()) == sorted(j.id for j in PERIODIC_JOBS)
