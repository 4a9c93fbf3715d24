"""CPU of one one-recipient in-app trigger's planning job, in the worker and in PostgreSQL.

Seeds an organization, an in-app template and ``--recipients`` recipients in the bench's own
database (recreated and migrated at start, dropped at the end unless ``--keep``) and Redis
database (flushed), then, ``--runs`` times: creates ``--jobs`` one-recipient triggers
through ``notifications.services.trigger`` (not measured), and runs their planning jobs in
this process with one ``WhistleSimpleWorker(...).work(burst=True)`` inside the app context, as
``whistle worker --simple`` does. It reports per job:

- **worker CPU**: ``getrusage`` of this process over the burst (RQ's own work included);
- **PostgreSQL CPU**: the backends serving the bench database, from /proc;
- **statements** sent to PostgreSQL (``before_cursor_execute``) and **commits**;

and the median of the runs. CPU, not wall time: other people's work shares the cores and
moves wall-clock numbers, much less CPU time. Redis's CPU is the whole server's (other
users included), so it is shown but not summed.

    .venv/bin/python bench/trigger_job.py                      # 3 runs of 500 jobs
    .venv/bin/python bench/trigger_job.py --mode direct        # the job function, no RQ
    .venv/bin/python bench/trigger_job.py --profile /tmp/trigger.prof --runs 1
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ``python bench/x.py`` puts bench/ first on sys.path, where bench/email.py would shadow the
# standard library's email package: look modules up from the project root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
from typing import Any  # noqa: E402

from bench.broadcast import (  # noqa: E402
    bench_app,
    cpu_seconds,
    exit_on_sigterm,
    make_organization,
    wait_until_quiet,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/whistle_bench_trigger"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
# The template and trigger of bench/api.py: what ``POST /api/v1/notifications`` sends there.
IN_APP_CONTENT = {
    "in_app": {
        "title": "Hi {{ recipient.name or 'there' }}",
        "body": "{{ data.headline }}",
        "action_url": "https://example.com/whats-new",
    }
}
TRIGGER_DATA = {"headline": "Benchmarks"}


def seed_recipients(count: int) -> None:
    from whistle_web.extensions import db
    from whistle_web.models import Recipient

    db.session.add_all(
        Recipient(external_id=f"u{i}", name=f"User {i}", timezone="UTC") for i in range(count)
    )
    db.session.commit()


def create_triggers(count: int, recipients: int, offset: int) -> list[int]:
    """``count`` one-recipient in-app triggers (their planning jobs wait in Redis)."""
    from whistle_web.errors import Actor
    from whistle_web.notifications.services import trigger

    actor = Actor.system("bench")
    return [
        trigger(
            "bench",
            to=[f"u{(offset + i) % recipients}"],
            channels=["in_app"],
            data=TRIGGER_DATA,
            actor=actor,
        ).id
        for i in range(count)
    ]


class Statements:
    """Statements and commits sent on the app's engine while counting."""

    def __init__(self) -> None:
        from sqlalchemy import event

        from whistle_web.extensions import db

        self.statements = self.commits = 0
        self.counting = False
        event.listen(db.engine, "before_cursor_execute", self._statement)
        event.listen(db.engine, "commit", self._commit)

    def _statement(self, *args: Any) -> None:
        if self.counting:
            self.statements += 1

    def _commit(self, *args: Any) -> None:
        if self.counting:
            self.commits += 1


def quiet_logs() -> None:
    """Send log lines (RQ's two INFO lines a job) to /dev/null: still formatted, not shown."""
    import logging

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_jobs(args: argparse.Namespace, org_id: int, request_ids: list[int]) -> None:
    from whistle_web import get_redis
    from workers.queues import QUEUES
    from workers.sending import plan_send_request
    from workers.worker import WhistleSimpleWorker

    if args.mode == "rq":
        WhistleSimpleWorker(list(QUEUES), connection=get_redis()).work(burst=True)
        return
    for request_id in request_ids:
        plan_send_request(request_id, org_id)


def measure(
    args: argparse.Namespace, org_id: int, counter: Statements, offset: int, profile: Any
) -> dict[str, float]:
    from whistle_web import get_redis
    from whistle_web.extensions import db
    from whistle_web.tenancy import organization_scope

    with organization_scope(org_id):
        request_ids = create_triggers(args.jobs, args.recipients, offset)
    db.session.remove()  # a worker starts each job with nothing loaded
    if args.mode == "direct":
        get_redis().flushdb()  # the queued jobs are run by hand here
    if args.quiet_wait:
        wait_until_quiet(args.quiet_wait)
    counter.statements = counter.commits = 0
    counter.counting = True
    quiet_logs()
    cpu_before, before = own_cpu(), cpu_seconds(set())
    if profile is not None:
        profile.enable()
    run_jobs(args, org_id, request_ids)
    if profile is not None:
        profile.disable()
    cpu_after, after = own_cpu(), cpu_seconds(set())
    counter.counting = False
    verify(org_id, request_ids)
    n = len(request_ids)
    return {
        "worker_ms": (cpu_after - cpu_before) * 1000 / n,
        "postgres_ms": (after["postgres"] - before["postgres"]) * 1000 / n,
        "redis_ms": (after["redis"] - before["redis"]) * 1000 / n,
        "statements": counter.statements / n,
        "commits": counter.commits / n,
    }


def verify(org_id: int, request_ids: list[int]) -> None:
    """Every request planned, and its one in-app delivery sent; no failed job."""
    from rq.registry import FailedJobRegistry
    from sqlalchemy import func, select

    from whistle_web import get_redis
    from whistle_web.deliveries.models import Delivery
    from whistle_web.extensions import db
    from whistle_web.models import Notification, SendRequest
    from whistle_web.notifications.models import SendRequestStatus
    from whistle_web.tenancy import organization_scope
    from workers.queues import QUEUES

    failed = sum(FailedJobRegistry(q, connection=get_redis()).count for q in QUEUES)
    with organization_scope(org_id):
        planned = db.session.scalar(
            select(func.count())
            .select_from(SendRequest)
            .where(SendRequest.id.in_(request_ids), SendRequest.status == SendRequestStatus.PLANNED)
        )
        sent = db.session.execute(
            select(Delivery.status, func.count())
            .join(Notification, Notification.id == Delivery.notification_id)
            .where(Notification.send_request_id.in_(request_ids))
            .group_by(Delivery.status)
        ).all()
    db.session.rollback()
    statuses = {str(s): n for s, n in sent}
    if failed or planned != len(request_ids) or statuses != {"sent": len(request_ids)}:
        raise SystemExit(f"wrong outcome: {failed} failed jobs, {planned} planned, {statuses}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="trigger jobs per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--recipients", type=int, default=500)
    parser.add_argument(
        "--mode",
        choices=("rq", "direct"),
        default="rq",
        help="run the jobs with WhistleSimpleWorker (default) or call the job function directly",
    )
    parser.add_argument("--warmup", type=int, default=50, help="jobs run first, not measured")
    parser.add_argument("--profile", help="write cProfile stats of the measured jobs here")
    parser.add_argument(
        "--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--keep", action="store_true", help="keep the bench database at the end")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30,
        help="seconds to wait for an idle machine before each run (0: do not wait)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    with bench_app(args):
        from whistle_web.tenancy import organization_scope

        org_id, _ = make_organization("bench-trigger", IN_APP_CONTENT)
        with organization_scope(org_id):
            seed_recipients(args.recipients)
        counter = Statements()
        profile = None
        if args.warmup:  # imports, compiled statements, the template cache
            warm = argparse.Namespace(**{**vars(args), "jobs": args.warmup, "quiet_wait": 0})
            measure(warm, org_id, counter, 0, None)
        if args.profile:
            import cProfile
            import time

            profile = cProfile.Profile(time.process_time)  # CPU, not waits on PostgreSQL
        results = []
        for run in range(args.runs):
            result = measure(args, org_id, counter, (run + 1) * args.jobs, profile)
            results.append(result)
            print(
                f"run {run + 1}: {args.jobs} jobs ({args.mode}): per job worker CPU "
                f"{result['worker_ms']:.2f} ms, PostgreSQL CPU {result['postgres_ms']:.2f} ms, "
                f"{result['statements']:.1f} statements, {result['commits']:.1f} commits "
                f"(Redis server {result['redis_ms']:.2f} ms)",
                flush=True,
            )
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(
            f"median of {args.runs}: worker CPU {median['worker_ms']:.2f} ms, PostgreSQL CPU "
            f"{median['postgres_ms']:.2f} ms, {median['statements']:.1f} statements, "
            f"{median['commits']:.1f} commits per one-recipient trigger job"
        )
        if profile is not None:
            profile.dump_stats(args.profile)
            print(f"profile written to {args.profile}")
        print(json.dumps({"mode": args.mode, "jobs": args.jobs, "runs": results}))


if __name__ == "__main__":
    main()
