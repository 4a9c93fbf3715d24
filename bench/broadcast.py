"""In-app broadcast to N recipients through real workers, against one RQ job per recipient.

Both sides run in one process tree on this machine, against the bench's own database
(recreated at start, dropped at the end unless ``--keep``) and its own Redis database:

- **baseline**: a 10,000-recipient slice of the audience, pre-planned (not timed) by the
  real planner, then one RQ job per recipient (``send_one``: claim the delivery, render,
  publish through the in-app provider, record it sent with its counters — the dispatch
  code with one delivery at a time), processed by the same two workers;
- **broadcast**: a campaign to all N recipients, launched through the campaign service and
  timed from the launch until every delivery is ``sent`` (planning included).

The workers are two ``whistle worker`` processes (``--simple`` by default: see
bench/README.md), started before the clock starts and stopped at the end.

    .venv/bin/python bench/broadcast.py                       # 1,000,000 recipients
    .venv/bin/python bench/broadcast.py --recipients 100000   # a quick run
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
import atexit  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/whistle_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"
VENV_BIN = ROOT / ".venv" / "bin"
IN_APP_CONTENT = {
    "in_app": {
        "title": "Hi {{ recipient.name or 'there' }}",
        "body": "{{ data.headline }} ({{ recipient.attributes.plan | default('free') }} plan)",
        "action_url": "https://example.com/whats-new",
    }
}
CAMPAIGN_DATA = {"headline": "Dark mode is here"}


# --- services: the bench's own database and Redis on 127.0.0.1 only ---------------------


def local_url(url: str, what: str) -> str:
    host = urlsplit(url).hostname
    if host != "127.0.0.1":
        raise SystemExit(f"{what} must point at 127.0.0.1, not {host!r}: {url}")
    return url


def recreate_database(database_url: str) -> None:
    """Drop and create the bench database (it is the bench's own), then migrate it."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    if not name.startswith("whistle_bench"):
        raise SystemExit(f"refusing to recreate {name!r}: the bench database is whistle_bench*")
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    subprocess.run(
        [str(VENV_BIN / "flask"), "--app", "wsgi", "db", "upgrade"],
        cwd=ROOT,
        env=service_env(database_url, os.environ["REDIS_URL"]),
        check=True,
        capture_output=True,
    )


def drop_database(database_url: str) -> None:
    import psycopg
    from psycopg import sql

    parts = urlsplit(database_url)
    admin = parts._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(parts.path.lstrip("/"))
            )
        )


def service_env(database_url: str, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        WHISTLE_ENV="development",
        WHISTLE_LOG_LEVEL="WARNING",
        # Workers import this module to run the baseline's jobs.
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def setup_services(args: argparse.Namespace) -> None:
    os.environ["DATABASE_URL"] = local_url(args.database_url, "--database-url")
    os.environ["REDIS_URL"] = local_url(args.redis_url, "--redis-url")
    os.environ.setdefault("WHISTLE_LOG_LEVEL", "WARNING")


# --- workers -----------------------------------------------------------------------------


class Workers:
    """``whistle worker`` processes started by the bench, stopped by their pids."""

    def __init__(self, count: int, *, simple: bool, log_dir: Path) -> None:
        self.count, self.simple, self.log_dir = count, simple, log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, redis: Any) -> None:
        from rq import Worker

        env = service_env(os.environ["DATABASE_URL"], os.environ["REDIS_URL"])
        command = [str(VENV_BIN / "whistle"), "worker"] + (["--simple"] if self.simple else [])
        for i in range(self.count):
            log = (self.log_dir / f"worker-{i}.log").open("wb")
            self.procs.append(
                subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        atexit.register(self.stop)
        pids = {p.pid for p in self.procs}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if {w.pid for w in Worker.all(connection=redis)} >= pids:
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"workers did not start; see {self.log_dir}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown: finish the current job
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    @property
    def label(self) -> str:
        return f"{self.count} {'--simple' if self.simple else 'forking'} workers"


# --- data --------------------------------------------------------------------------------


def copy_recipients(org_id: int, count: int, *, email: bool = False) -> None:
    """Seed ``count`` recipients with COPY (about 1 s per 100,000)."""
    from whistle_web.extensions import db

    raw = db.session.connection().connection.driver_connection
    columns = "organization_id, external_id, name, email, locale, timezone, attributes"
    plans = ('{"plan": "pro"}', '{"plan": "team"}', "{}")
    with raw.cursor() as cursor:
        with cursor.copy(f"COPY recipients ({columns}) FROM STDIN") as copy:
            for start in range(0, count, 50_000):
                buffer = io.StringIO()
                for i in range(start, min(count, start + 50_000)):
                    address = f"user{i}@example.com" if email else r"\N"
                    buffer.write(
                        f"{org_id}\tu{i}\tUser {i}\t{address}\ten\tEurope/Berlin\t{plans[i % 3]}\n"
                    )
                copy.write(buffer.getvalue())
        cursor.execute("ANALYZE recipients")


def make_organization(name: str, content: dict[str, Any]) -> tuple[int, int]:
    """An organization with a published template ``bench``; returns (org id, template id)."""
    from whistle_web.extensions import db
    from whistle_web.models import Template, TemplateVersion, VersionState
    from whistle_web.organizations.services import create_organization
    from whistle_web.tenancy import organization_scope

    org = create_organization(name)
    with organization_scope(org.id):
        template = Template(key="bench", name="Bench")
        db.session.add(template)
        db.session.flush()
        version = TemplateVersion(
            template_id=template.id, version=1, state=VersionState.PUBLISHED, content=content
        )
        db.session.add(version)
        db.session.flush()
        template.published_version_id = version.id
        db.session.commit()
        return org.id, template.id


def add_in_app_provider(org_id: int) -> None:
    from whistle_web.channels.kinds import Channel, ProviderKind
    from whistle_web.extensions import db
    from whistle_web.models import Provider
    from whistle_web.tenancy import organization_scope

    with organization_scope(org_id):
        provider = Provider(channel=Channel.IN_APP, kind=ProviderKind.IN_APP, name="Inbox")
        provider.set_credentials({})
        db.session.add(provider)
        db.session.commit()


def wait_for(condition: Callable[[], bool], timeout: float, poll: float = 0.1) -> None:
    from whistle_web.extensions import db

    deadline = time.monotonic() + timeout
    while True:
        done = condition()
        db.session.rollback()  # no transaction (and no snapshot) held between polls
        if done:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s")
        time.sleep(poll)


def cpu_seconds(worker_pids: set[int]) -> dict[str, float]:
    """CPU time used so far: the machine, the bench's workers, PostgreSQL and Redis.

    ``postgres`` counts the backends serving the bench's database (their process title
    names it) while they live; ``redis`` the whole server (other users included).
    """
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / tick  # all but idle and iowait
    used = {"machine": busy, "workers": 0.0, "postgres": 0.0, "redis": 0.0}
    database = urlsplit(os.environ.get("DATABASE_URL", "")).path.lstrip("/").encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        rest = raw[raw.rindex(")") + 2 :].split()
        # utime + stime, and cutime + cstime: what its exited children used (a forking
        # worker's work horses) moves there when they are reaped.
        seconds = sum(int(v) for v in rest[11:15]) / tick
        if int(entry.name) in worker_pids or int(rest[1]) in worker_pids:
            used["workers"] += seconds
        elif name.startswith("postgres") and database and b" " + database + b" " in title:
            used["postgres"] += seconds
        elif name.startswith("redis-server"):
            used["redis"] += seconds
    return used


def wait_until_quiet(max_wait: float, busy_below: float = 0.15) -> float:
    """Wait (up to ``max_wait`` s) for a second in which the machine is mostly idle.

    Other engineers' test runs share the cores; returns the busy fraction last seen.
    """

    def busy_and_total() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    deadline = time.monotonic() + max_wait
    while True:
        busy0, total0 = busy_and_total()
        time.sleep(1.0)
        busy1, total1 = busy_and_total()
        busy = (busy1 - busy0) / max(1, total1 - total0)
        if busy < busy_below or time.monotonic() > deadline:
            if busy >= busy_below:
                print(f"  (machine still {busy:.0%} busy after {max_wait:.0f} s: timing anyway)")
            return busy


def cpu_line(cpu: dict[str, float], seconds: float) -> str:
    ours = cpu["workers"] + cpu["postgres"] + cpu["redis"]
    cores = os.cpu_count() or 1
    return (
        f"  CPU: {cpu['machine'] / seconds / cores:.0%} of {cores} cores busy; core-seconds: "
        f"workers {cpu['workers']:.1f}, PostgreSQL backends {cpu['postgres']:.1f}, "
        f"Redis {cpu['redis']:.1f}, everything else {max(0.0, cpu['machine'] - ours):.1f} "
        "(sinks, WAL writer, other users of the machine)"
    )


def publish_calls(redis: Any) -> int:
    """PUBLISH commands the Redis server ran so far (server-wide)."""
    stats = redis.info("commandstats").get("cmdstat_publish", {})
    return int(stats.get("calls", 0))


# --- the baseline: one RQ job per recipient ----------------------------------------------


def send_one(delivery_id: int, send_request_id: int, organization_id: int) -> str:
    """Baseline job: claim one delivery, render, publish through the provider, record it."""
    from sqlalchemy import update

    from whistle_web.channels.kinds import Channel
    from whistle_web.deliveries import dispatch
    from whistle_web.deliveries.models import Delivery
    from whistle_web.deliveries.status import DeliveryStatus
    from whistle_web.extensions import db
    from whistle_web.notifications.models import SendRequest
    from whistle_web.tenancy import organization_scope

    with organization_scope(organization_id):
        claimed = list(
            db.session.scalars(
                update(Delivery)
                .where(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.QUEUED)
                .values(status=DeliveryStatus.SENDING, attempts=Delivery.attempts + 1)
                .returning(Delivery.id)
                .execution_options(synchronize_session=False)
            )
        )
        db.session.commit()
        if not claimed:
            return "already claimed"
        request = db.session.get(SendRequest, send_request_id)
        context = dispatch.ChannelContext.load(request, Channel.IN_APP)
        return f"sent {dispatch.deliver(claimed, context)}"


def run_baseline(org_id: int, template_id: int, count: int) -> dict[str, Any]:
    from rq import Queue
    from sqlalchemy import func, select

    from whistle_web import get_redis
    from whistle_web.deliveries.models import BatchStatus, Delivery, DeliveryBatch
    from whistle_web.deliveries.planner import Planner
    from whistle_web.deliveries.status import DeliveryStatus
    from whistle_web.extensions import db
    from whistle_web.models import Recipient, TemplateVersion
    from whistle_web.notifications.models import SendRequest, SendRequestKind, SendRequestStatus
    from whistle_web.tenancy import organization_scope
    from workers.queues import DEFAULT

    with organization_scope(org_id):
        ids = list(db.session.scalars(select(Recipient.id).order_by(Recipient.id).limit(count)))
        version_id = db.session.scalar(
            select(TemplateVersion.id).where(TemplateVersion.template_id == template_id)
        )
        request = SendRequest(
            kind=SendRequestKind.TRIGGER,
            template_id=template_id,
            template_version_id=version_id,
            audience={"type": "recipients", "ids": ids},
            data=CAMPAIGN_DATA,
            channels=["in_app"],
            max_recipient_id=ids[-1],
            status=SendRequestStatus.PLANNED,
        )
        db.session.add(request)
        db.session.flush()
        planner = Planner(request, write_in_app_sent=False)  # queued, for one job each
        for start in range(0, len(ids), 1000):
            planner.plan_batch(ids[start : start + 1000])
            db.session.commit()
        request_id = request.id
        batch_ids = list(
            db.session.scalars(
                select(DeliveryBatch.id).where(DeliveryBatch.send_request_id == request_id)
            )
        )
        delivery_ids = list(
            db.session.scalars(
                select(Delivery.id).where(Delivery.batch_id.in_(batch_ids)).order_by(Delivery.id)
            )
        )
        db.session.commit()

    def sent() -> int:
        with organization_scope(org_id):
            return db.session.scalar(
                select(func.count()).where(
                    Delivery.batch_id.in_(batch_ids), Delivery.status == DeliveryStatus.SENT
                )
            )

    queue = Queue(DEFAULT, connection=get_redis())
    start = time.perf_counter()
    for first in range(0, len(delivery_ids), 1000):
        queue.enqueue_many(
            [
                Queue.prepare_data(
                    # By name: this file runs as __main__, the workers import it as a module.
                    "bench.broadcast.send_one",
                    args=(delivery_id, request_id, org_id),
                    result_ttl=600,
                    description=f"baseline delivery {delivery_id}",
                )
                for delivery_id in delivery_ids[first : first + 1000]
            ]
        )
    wait_for(lambda: sent() >= len(delivery_ids), timeout=3600, poll=0.2)
    seconds = time.perf_counter() - start
    with organization_scope(org_id):
        # The batches were only containers for the planner: close them.
        db.session.execute(
            DeliveryBatch.__table__.update()
            .where(DeliveryBatch.id.in_(batch_ids))
            .values(status=BatchStatus.DONE)
        )
        db.session.commit()
    return {"recipients": len(delivery_ids), "seconds": seconds}


# --- the broadcast -----------------------------------------------------------------------


def run_broadcast(org_id: int, recipients: int) -> dict[str, Any]:
    from sqlalchemy import select

    from whistle_web.campaigns.models import Campaign, CampaignStatus
    from whistle_web.campaigns.services import create_campaign, launch_campaign
    from whistle_web.errors import Actor
    from whistle_web.extensions import db
    from whistle_web.notifications.models import SendRequest
    from whistle_web.tenancy import organization_scope

    actor = Actor.system("bench")
    with organization_scope(org_id):
        campaign = create_campaign(
            "Broadcast",
            template_key="bench",
            channels=["in_app"],
            audience_type="all",
            data=CAMPAIGN_DATA,
            actor=actor,
        )
        campaign_id = campaign.id
        db.session.commit()

    def status() -> CampaignStatus:
        with organization_scope(org_id):
            return db.session.scalar(select(Campaign.status).where(Campaign.id == campaign_id))

    launched = datetime.now(UTC)
    start = time.perf_counter()
    with organization_scope(org_id):
        launch_campaign(campaign_id, actor=actor)
    wait_for(lambda: status() in (CampaignStatus.COMPLETED, CampaignStatus.FAILED), 7200, 0.05)
    seconds = time.perf_counter() - start
    with organization_scope(org_id):
        request = db.session.scalar(
            select(SendRequest).where(SendRequest.campaign_id == campaign_id)
        )
        planned = (request.planned_at - launched).total_seconds() if request.planned_at else None
        db.session.commit()
    return {
        "recipients": recipients,
        "seconds": seconds,
        "campaign_id": campaign_id,
        "planned_after": planned,
        "status": status(),
    }


def verify(org_id: int, campaign_id: int, expected: int) -> dict[str, int]:
    """Every delivery sent, once, and the live funnel counters equal a recount of the ledger."""
    from sqlalchemy import func, select

    from whistle_web.deliveries.models import Delivery, DeliveryBatch, StatScope
    from whistle_web.deliveries.services import FUNNEL_STEPS, funnel, rebuild_stats
    from whistle_web.extensions import db
    from whistle_web.tenancy import organization_scope

    with organization_scope(org_id):
        ledger = dict(
            db.session.execute(
                select(Delivery.status, func.count())
                .where(Delivery.campaign_id == campaign_id)
                .group_by(Delivery.status)
            ).all()
        )
        batches = db.session.scalar(
            select(func.count()).select_from(DeliveryBatch).where(DeliveryBatch.status != "done")
        )
        live = funnel(StatScope.CAMPAIGN, campaign_id)
        savepoint = db.session.begin_nested()
        rebuild_stats(StatScope.CAMPAIGN, campaign_id)
        rebuilt = funnel(StatScope.CAMPAIGN, campaign_id)
        savepoint.rollback()
        db.session.rollback()
    counts = {str(k): v for k, v in ledger.items()}
    problems = []
    if counts != {"sent": expected}:
        problems.append(f"ledger is {counts}, expected {expected} sent")
    if batches:
        problems.append(f"{batches} batches not done")
    for metric in FUNNEL_STEPS:
        a = live.get("all", {}).get(metric, 0)
        b = rebuilt.get("all", {}).get(metric, 0)
        if a != b:
            problems.append(f"counter {metric}: live {a} != ledger {b}")
    if problems:
        raise SystemExit("verification failed: " + "; ".join(problems))
    return {k: v for k, v in live.get("all", {}).items() if v}


# --- main --------------------------------------------------------------------------------


@contextlib.contextmanager
def bench_app(args: argparse.Namespace) -> Iterator[Any]:
    setup_services(args)
    recreate_database(args.database_url)
    if not args.keep:
        atexit.register(drop_database, args.database_url)
    from whistle_web import create_app, get_redis

    app = create_app()
    with app.app_context():
        get_redis().flushdb()  # the bench's own Redis database
        try:
            yield app
        finally:
            get_redis().flushdb()
            from whistle_web.extensions import db

            db.session.remove()
            db.engine.dispose()  # the database is dropped at exit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=1_000_000)
    parser.add_argument("--baseline", type=int, default=10_000, help="baseline slice size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--worker-mode",
        choices=("simple", "fork"),
        default="simple",
        help="whistle worker --simple (default) or the forking worker",
    )
    parser.add_argument(
        "--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--keep", action="store_true", help="keep the bench database at the end")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120,
        help="seconds to wait for an idle machine before each timed run (0: do not wait)",
    )
    return parser.parse_args(argv)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the workers are stopped and the database dropped."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="whistle-bench-") as tmp, bench_app(args):
        from whistle_web import get_redis
        from whistle_web.extensions import db

        seed_start = time.perf_counter()
        org_id, template_id = make_organization(f"bench-{time.time_ns()}", IN_APP_CONTENT)
        add_in_app_provider(org_id)
        copy_recipients(org_id, args.recipients)
        db.session.commit()
        print(
            f"seeded {args.recipients:,} recipients in {time.perf_counter() - seed_start:.1f} s",
            flush=True,
        )
        workers = Workers(args.workers, simple=args.worker_mode == "simple", log_dir=Path(tmp))
        workers.start(get_redis())
        try:
            baseline = None
            if not args.skip_baseline:
                wait_until_quiet(args.quiet_wait)
                baseline = run_baseline(org_id, template_id, min(args.baseline, args.recipients))
                report("baseline (1 RQ job per recipient)", baseline, workers.label)
            wait_until_quiet(args.quiet_wait)
            publishes = publish_calls(get_redis())
            pids = {p.pid for p in workers.procs}
            cpu_before = cpu_seconds(pids)
            result = run_broadcast(org_id, args.recipients)
            cpu = {k: v - cpu_before[k] for k, v in cpu_seconds(pids).items()}
            publishes = publish_calls(get_redis()) - publishes
        finally:
            workers.stop()
        report("broadcast (campaign, batched)", result, workers.label)
        if result["planned_after"] is not None:
            print(f"  planning finished after {result['planned_after']:.1f} s")
        counters = verify(org_id, result["campaign_id"], args.recipients)
        print(f"  verified: {args.recipients:,} sent, counters equal the ledger {counters}")
        print(f"  PUBLISH calls on the Redis server during the broadcast: {publishes:,}")
        print(cpu_line(cpu, result["seconds"]))
        if baseline is not None:
            ratio = rate(result) / rate(baseline)
            print(f"ratio broadcast/baseline: {ratio:.1f}x")
        print(json.dumps({"baseline": baseline, "broadcast": _plain(result)}, default=str))


def rate(result: dict[str, Any]) -> float:
    return result["recipients"] / result["seconds"]


def report(name: str, result: dict[str, Any], label: str) -> None:
    print(
        f"{name}: {result['recipients']:,} recipients, {result['seconds']:.2f} s, "
        f"{rate(result):,.0f} deliveries/s ({label})",
        flush=True,
    )


def _plain(result: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if k == "status" else v) for k, v in result.items()}


if __name__ == "__main__":
    main()
