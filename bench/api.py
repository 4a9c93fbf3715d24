"""API throughput: ``POST /api/v1/notifications`` against a ``GET /api/v1/health`` baseline.

Starts the production web process (``gunicorn -c gunicorn.conf.py wsgi:app``) on
127.0.0.1 against the bench's own database (recreated and migrated at start, dropped at the
end unless ``--keep``) and its own Redis database (flushed), seeds an organization with an
API key, an in-app template and one recipient, then drives each endpoint with the same
number of concurrent closed-loop clients (each sends its next request when the previous one
answered) for a fixed time after a warm-up, and reports requests/s and p50/p99 latency for
both and the ratio trigger/health, and where the CPU went during each.

By default no worker runs: triggers are accepted (202) and their planning jobs wait in
Redis, which is what the web process does on its own. ``--workers N`` also starts N
Procfile workers (``flask --app wsgi whistle worker --simple``) on the same cores, so
every trigger is planned and delivered while the web process answers.

The load comes from wrk when it is installed (``apt-get install wrk``): a C load generator
that takes ~0.03 ms of CPU per request, so the server keeps nearly all of the two cores.
Without it (or with ``--load python``) clients are processes with threads on plain
``http.client`` keep-alive connections, ~0.2-0.3 ms of CPU per request. Either way the
clients share this machine with the server, which the numbers include.

    .venv/bin/python bench/api.py                      # 32 clients, 10 s per endpoint
    .venv/bin/python bench/api.py --duration 20 --concurrency 64
    .venv/bin/python bench/api.py --worker-class gthread
    .venv/bin/python bench/api.py --workers 1          # the Procfile's worker alongside
    .venv/bin/python bench/api.py --load python        # the Python clients instead of wrk
    .venv/bin/python bench/api.py --server-log /tmp/gunicorn.log  # keep the access log
    .venv/bin/python bench/api.py --idempotency-keys   # a key of its own on every trigger
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ``python bench/x.py`` puts bench/ first on sys.path: look modules up from the root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import atexit  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from bench.broadcast import wait_until_quiet  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/whistle_bench_api"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/4"
VENV_BIN = ROOT / ".venv" / "bin"
IN_APP_CONTENT = {
    "in_app": {
        "title": "Hi {{ recipient.name or 'there' }}",
        "body": "{{ data.headline }}",
        "action_url": "https://example.com/whats-new",
    }
}
RECIPIENT = "bench-user"
GOAL_RATIO = 0.40
GOAL_P99_MS = 50.0


# --- services: the bench's own database and Redis on 127.0.0.1 only ---------------------


def local_url(url: str, what: str) -> str:
    host = urlsplit(url).hostname
    if host != "127.0.0.1":
        raise SystemExit(f"{what} must point at 127.0.0.1, not {host!r}: {url}")
    return url


def service_env(args: argparse.Namespace, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=args.database_url,
        REDIS_URL=args.redis_url,
        WHISTLE_ENV="development",
        WHISTLE_LOG_LEVEL="WARNING",
        **extra,
    )
    return env


def recreate_database(args: argparse.Namespace) -> None:
    """Drop and create the bench database (it is the bench's own), then migrate it."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(args.database_url)
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
        env=service_env(args),
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


def seed(args: argparse.Namespace) -> tuple[str, int]:
    """An organization with an API key, an in-app template and one recipient.

    Returns:
        (the API key, the organization id).
    """
    os.environ.update(DATABASE_URL=args.database_url, REDIS_URL=args.redis_url)
    from whistle_web import create_app, get_redis
    from whistle_web.accounts.services import create_api_key
    from whistle_web.errors import Actor
    from whistle_web.extensions import db
    from whistle_web.models import Recipient, Template, TemplateVersion, VersionState
    from whistle_web.organizations.services import create_organization
    from whistle_web.tenancy import organization_scope

    app = create_app()
    with app.app_context():
        get_redis().flushdb()  # the bench's own Redis database
        org = create_organization(f"bench-api-{time.time_ns()}")
        with organization_scope(org.id):
            template = Template(key="bench", name="Bench")
            db.session.add(template)
            db.session.flush()
            version = TemplateVersion(
                template_id=template.id,
                version=1,
                state=VersionState.PUBLISHED,
                content=IN_APP_CONTENT,
            )
            db.session.add(version)
            db.session.flush()
            template.published_version_id = version.id
            db.session.add(Recipient(external_id=RECIPIENT, name="Bench", timezone="UTC"))
            issued = create_api_key("bench", actor=Actor.system("bench"))
            db.session.commit()
            org_id = org.id
        db.engine.dispose()
    return issued.secret, org_id


def count_send_requests(args: argparse.Namespace, org_id: int) -> tuple[int, int]:
    """How many send requests were written, and by how many statements: the web process
    groups concurrent triggers into one autocommit statement, whose rows share ``now()``."""
    from sqlalchemy import distinct, func, select

    from whistle_web import create_app
    from whistle_web.extensions import db
    from whistle_web.models import SendRequest
    from whistle_web.tenancy import organization_scope

    app = create_app()
    with app.app_context(), organization_scope(org_id):
        count, statements = db.session.execute(
            select(func.count(), func.count(distinct(SendRequest.created_at)))
        ).one()
        db.session.rollback()
        db.engine.dispose()
    return int(count or 0), int(statements or 0)


def flush_redis(args: argparse.Namespace) -> None:
    import redis

    redis.Redis.from_url(args.redis_url).flushdb()


# --- the web process ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` started by the bench, stopped by its pid."""

    def __init__(self, args: argparse.Namespace, log_path: Path) -> None:
        self.args, self.log_path = args, log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = service_env(
            self.args,
            PORT=str(self.port),
            WHISTLE_BIND_HOST="127.0.0.1",
            WHISTLE_API_RATE_LIMIT="100000000 per minute",
        )
        if self.args.web_concurrency:
            env["WEB_CONCURRENCY"] = str(self.args.web_concurrency)
        if self.args.worker_class:
            env["WHISTLE_WEB_WORKER_CLASS"] = self.args.worker_class
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                status, _ = request_once(self.port, "GET", "/api/v1/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"gunicorn did not start; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Workers:
    """The Procfile's ``worker`` processes, started by the bench and stopped by their pids."""

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args, self.log_dir = args, log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.procs}

    def start(self) -> None:
        import redis
        from rq import Worker

        command = [str(VENV_BIN / "flask"), "--app", "wsgi", "whistle", "worker", "--simple"]
        for i in range(self.args.workers):
            log = (self.log_dir / f"worker-{i}.log").open("wb")
            self.procs.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=service_env(self.args), stdout=log, stderr=log
                )
            )
        atexit.register(self.stop)
        connection = redis.Redis.from_url(self.args.redis_url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if {w.pid for w in Worker.all(connection=connection)} >= self.pids:
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


def queued_jobs(args: argparse.Namespace) -> int:
    """Jobs the workers have not picked up yet, over every queue they serve."""
    import redis
    from rq import Queue

    from workers.queues import QUEUES

    connection = redis.Redis.from_url(args.redis_url)
    return sum(Queue(name, connection=connection).count for name in QUEUES)


def unplanned_send_requests(database_url: str) -> int:
    """Send requests no worker has finished planning (one per trigger)."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM send_requests WHERE status IN ('pending', 'planning')"
        ).fetchone()
    return int(row[0]) if row else 0


def drain(args: argparse.Namespace, web_pid: int, workers: Workers) -> dict[str, float]:
    """Time the workers, alone now, through the jobs the trigger phase left queued (a job
    plans one trigger, or a group of triggers written together)."""
    waiting = queued_jobs(args)
    unplanned = unplanned_send_requests(args.database_url)
    before = cpu_seconds(args.database_url, web_pid, workers.pids)
    started = time.monotonic()
    while queued_jobs(args) and time.monotonic() - started < 300:
        time.sleep(0.2)
    # The last job may still be running when the queue is empty.
    while unplanned_send_requests(args.database_url) and time.monotonic() - started < 300:
        time.sleep(0.05)
    seconds = time.monotonic() - started
    left = queued_jobs(args)
    cpu = cpu_split(before, cpu_seconds(args.database_url, web_pid, workers.pids), seconds)
    planned = unplanned - unplanned_send_requests(args.database_url)
    done = max(1, planned)
    print(
        f"  drained {waiting - left:,} jobs planning {planned:,} triggers in {seconds:.1f} s "
        f"({done / seconds:.0f} triggers/s, {left:,} jobs left) with the web process idle; "
        f"per trigger: workers {cpu['workers'] * 1000 / done:.2f} ms CPU, PostgreSQL "
        f"{cpu['postgres'] * 1000 / done:.2f} ms, Redis {cpu['redis'] * 1000 / done:.2f} ms; "
        f"everything else {cpu['everything_else']:.1f} core-s",
        flush=True,
    )
    return {"jobs": waiting - left, "triggers": planned, "seconds": seconds, **cpu}


def request_once(port: int, method: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --- load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]
    unique_header: str | None = None  # a header with a value of its own on every request

    @property
    def label(self) -> str:
        unique = f" ({self.unique_header}s)" if self.unique_header else ""
        return f"{self.method} {self.path}{unique}"


def client_process(
    port: int, target: Target, threads: int, measure_from: float, stop_at: float
) -> tuple[list[float], dict[int, int], int, int]:
    """Run ``threads`` closed-loop clients until ``stop_at`` (wall clock).

    Returns:
        Latencies (s) of requests sent and answered within the window, status counts in the
        window, connection errors, and all requests answered (warm-up included).
    """
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = [0]
    answered = [0]
    lock = threading.Lock()

    def run() -> None:
        mine: list[float] = []
        counts: dict[int, int] = {}
        total = 0
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while True:
            started_wall = time.time()
            if started_wall >= stop_at:
                break
            headers = target.headers
            if target.unique_header:
                headers = {**headers, target.unique_header: uuid.uuid4().hex}
            started = time.perf_counter()
            try:
                conn.request(target.method, target.path, body=target.body, headers=headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                with lock:
                    errors[0] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            elapsed = time.perf_counter() - started
            total += 1
            if started_wall >= measure_from and started_wall + elapsed <= stop_at:
                mine.append(elapsed)
                counts[status] = counts.get(status, 0) + 1
        conn.close()
        with lock:
            latencies.extend(mine)
            answered[0] += total
            for status, n in counts.items():
                statuses[status] = statuses.get(status, 0) + n

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return latencies, statuses, errors[0], answered[0]


def drive(
    port: int, target: Target, *, concurrency: int, processes: int, warmup: float, duration: float
) -> dict[str, Any]:
    per_process = [
        concurrency // processes + (i < concurrency % processes) for i in range(processes)
    ]
    per_process = [n for n in per_process if n]
    start = time.time() + 1.0  # let the processes start
    measure_from = start + warmup
    stop_at = measure_from + duration
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = answered = 0
    with ProcessPoolExecutor(max_workers=len(per_process)) as pool:
        futures = [
            pool.submit(client_process, port, target, n, measure_from, stop_at) for n in per_process
        ]
        for future in futures:
            lat, counts, errs, total = future.result()
            latencies += lat
            errors += errs
            answered += total
            for status, n in counts.items():
                statuses[status] = statuses.get(status, 0) + n
    latencies.sort()
    return {
        "endpoint": target.label,
        "requests": len(latencies),
        "seconds": duration,
        "rps": len(latencies) / duration,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p90_ms": percentile(latencies, 0.90) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] if latencies else 0.0) * 1000,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "connection_errors": errors,
        "answered_in_phase": answered,
    }


WRK_SCRIPT = """
wrk.method = %(method)s
wrk.body = %(body)s
%(headers)s
counts = {}  -- a global: done() reads it from every thread
function response(status, headers, body)
    counts[status] = (counts[status] or 0) + 1
end
local threads = {}
function setup(thread)
    table.insert(threads, thread)
    thread:set("id", #threads)
end
%(unique)s
function done(summary, latency, requests)
    local all = {}
    for _, thread in ipairs(threads) do
        for status, n in pairs(thread:get("counts")) do
            all[status] = (all[status] or 0) + n
        end
    end
    local parts = {}
    for status, n in pairs(all) do
        table.insert(parts, string.format('"%%d": %%d', status, n))
    end
    local e = summary.errors
    io.write(string.format(
        'WRK_RESULT {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p90_us": %%d, '
        .. '"p99_us": %%d, "max_us": %%d, "errors": %%d, "statuses": {%%s}}\\n',
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency.max, e.connect + e.read + e.write + e.timeout,
        table.concat(parts, ", ")))
end
"""


WRK_UNIQUE = """
local prefix, counter = nil, 0
function init(args)
    prefix = args[1] .. "-" .. wrk.thread:get("id") .. "-"
end
function request()
    counter = counter + 1
    wrk.headers[%(header)s] = prefix .. counter
    return wrk.format()
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lua string literal for this text


def drive_wrk(
    port: int, target: Target, *, concurrency: int, warmup: float, duration: float, **_: Any
) -> dict[str, Any]:
    """Drive ``target`` with wrk: ``concurrency`` keep-alive connections, each sending its
    next request when the previous one answered, over 2 threads (one per core here)."""
    headers = "\n".join(
        f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in target.headers.items()
    )
    unique = ""
    if target.unique_header:  # run nonce (wrk's argument) + thread + counter
        unique = WRK_UNIQUE % {"header": _lua_string(target.unique_header)}
    script = WRK_SCRIPT % {
        "method": _lua_string(target.method),
        "body": _lua_string(target.body.decode()) if target.body else "nil",
        "headers": headers,
        "unique": unique,
    }
    url = f"http://127.0.0.1:{port}{target.path}"
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        threads = str(min(2, concurrency))

        def run(seconds: float) -> dict[str, Any]:
            out = subprocess.run(
                [
                    "wrk",
                    "-t",
                    threads,
                    "-c",
                    str(concurrency),
                    "-d",
                    f"{seconds:g}s",
                    "--timeout",
                    "10s",
                    "-s",
                    lua.name,
                    url,
                    "--",
                    uuid.uuid4().hex,
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                raise SystemExit(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
            line = next(x for x in out.stdout.splitlines() if x.startswith("WRK_RESULT "))
            return json.loads(line.removeprefix("WRK_RESULT "))

        warm = run(warmup) if warmup > 0 else {"requests": 0}
        measured = run(duration)
    seconds = measured["duration_us"] / 1e6
    return {
        "endpoint": target.label,
        "requests": measured["requests"],
        "seconds": seconds,
        "rps": measured["requests"] / seconds,
        "p50_ms": measured["p50_us"] / 1000,
        "p90_ms": measured["p90_us"] / 1000,
        "p99_ms": measured["p99_us"] / 1000,
        "max_ms": measured["max_us"] / 1000,
        "statuses": dict(sorted(measured["statuses"].items())),
        "connection_errors": measured["errors"],
        "answered_in_phase": warm["requests"] + measured["requests"],
    }


# --- where the CPU went ------------------------------------------------------------------


def cpu_seconds(database_url: str, web_pid: int, worker_pids: set[int]) -> dict[str, float]:
    """CPU time used so far: the machine, and the bench's own processes by role.

    ``web`` is gunicorn's master and its workers; ``clients`` the bench process and its
    reaped client processes; ``postgres`` the backends serving the bench's database (their
    process title names it) while they live; ``redis`` the whole server (other users
    included).
    """
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / tick  # all but idle and iowait
    own = os.times()
    used = {
        "machine": busy,
        "web": 0.0,
        "workers": 0.0,
        "clients": own.user + own.system + own.children_user + own.children_system,
        "postgres": 0.0,
        "redis": 0.0,
    }
    database = urlsplit(database_url).path.lstrip("/").encode()
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
        pid, ppid = int(entry.name), int(rest[1])
        seconds = sum(int(v) for v in rest[11:15]) / tick  # utime, stime, cutime, cstime
        if web_pid in (pid, ppid):
            used["web"] += seconds
        elif pid in worker_pids or ppid in worker_pids:
            used["workers"] += seconds
        elif name.startswith("postgres") and b" " + database + b" " in title:
            used["postgres"] += seconds
        elif name.startswith("redis-server"):
            used["redis"] += seconds
    return used


def cpu_ours(cpu: dict[str, float]) -> float:
    return sum(cpu[k] for k in ("web", "workers", "clients", "postgres", "redis"))


def cpu_split(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    """Core-seconds per role over a phase, and what nobody of the bench's used."""
    used = {k: after[k] - before[k] for k in before}
    ours = sum(v for k, v in used.items() if k != "machine")
    used["everything_else"] = max(0.0, used["machine"] - ours)
    used["busy_share"] = used["machine"] / seconds / (os.cpu_count() or 1)
    return used


def cpu_line(cpu: dict[str, float], answered: int) -> str:
    machine = cpu["machine"] or 1.0
    per = 1000 / max(1, answered)
    return (
        f"  CPU per request (ms, {answered:,} answered in the phase): web {cpu['web'] * per:.2f}, "
        f"workers {cpu['workers'] * per:.2f}, clients {cpu['clients'] * per:.2f}, "
        f"PostgreSQL {cpu['postgres'] * per:.2f}, Redis {cpu['redis'] * per:.2f}; "
        f"all of the bench's {cpu_ours(cpu) * per:.2f}\n"
        f"  CPU: {cpu['busy_share']:.0%} of {os.cpu_count()} cores busy; core-seconds: "
        f"web {cpu['web']:.1f}, workers {cpu['workers']:.1f}, clients {cpu['clients']:.1f}, "
        f"PostgreSQL backends {cpu['postgres']:.1f}, Redis {cpu['redis']:.1f}, "
        f"everything else {cpu['everything_else']:.1f} "
        f"({cpu['everything_else'] / machine:.0%}: WAL writer, other users of the machine)"
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds measured per endpoint"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument(
        "--load",
        choices=("wrk", "python"),
        default="wrk" if shutil.which("wrk") else "python",
        help="load generator: wrk (apt-get install wrk; the default when installed) or "
        "closed-loop http.client threads in --client-processes processes",
    )
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument(
        "--web-concurrency", type=int, default=None, help="gunicorn workers (WEB_CONCURRENCY)"
    )
    parser.add_argument(
        "--idempotency-keys",
        action="store_true",
        help="send every trigger with an Idempotency-Key of its own (as careful "
        "integrations do): the key is taken by the trigger statement itself",
    )
    parser.add_argument(
        "--server-log",
        type=Path,
        default=None,
        help="keep gunicorn's log (access log included) at this path; with "
        "GUNICORN_CMD_ARGS=\"--access-logformat '%%(p)s %%(D)s %%(r)s'\" it gives each "
        "request's worker pid and time in the worker (µs)",
    )
    parser.add_argument(
        "--worker-class",
        choices=("gevent", "gthread"),
        default=None,
        help="gunicorn worker class (WHISTLE_WEB_WORKER_CLASS; gunicorn.conf.py's default)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="Procfile workers to run alongside (default 0)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="seconds to wait for an idle machine before each endpoint",
    )
    parser.add_argument(
        "--database-url", default=os.environ.get("BENCH_API_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_API_REDIS_URL", DEFAULT_REDIS_URL)
    )
    parser.add_argument("--keep", action="store_true", help="keep the bench database at the end")
    args = parser.parse_args(argv)
    local_url(args.database_url, "--database-url")
    local_url(args.redis_url, "--redis-url")
    return args


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so gunicorn is stopped and the database dropped."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def report(result: dict[str, Any]) -> None:
    print(
        f"{result['endpoint']:<28} {result['rps']:>8.0f} req/s   p50 {result['p50_ms']:6.1f} ms"
        f"   p90 {result['p90_ms']:6.1f} ms   p99 {result['p99_ms']:6.1f} ms"
        f"   max {result['max_ms']:6.1f} ms"
        f"   statuses {result['statuses']}   connection errors {result['connection_errors']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    recreate_database(args)
    if not args.keep:
        atexit.register(drop_database, args.database_url)
    atexit.register(flush_redis, args)
    api_key, org_id = seed(args)
    with tempfile.TemporaryDirectory(prefix="whistle-bench-api-") as tmp:
        server = Gunicorn(args, args.server_log or Path(tmp) / "gunicorn.log")
        workers = Workers(args, Path(tmp))
        server.start()
        try:
            if args.workers:
                workers.start()
            health = Target("health", "GET", "/api/v1/health", None, {})
            body = {"template": "bench", "to": [RECIPIENT], "channels": ["in_app"]}
            body["data"] = {"headline": "Benchmarks"}
            trigger = Target(
                "trigger",
                "POST",
                "/api/v1/notifications",
                json.dumps(body).encode(),
                {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
                "Idempotency-Key" if args.idempotency_keys else None,
            )
            print(
                f"gunicorn ({args.worker_class or 'gunicorn.conf.py default'} worker class, "
                f"WEB_CONCURRENCY {args.web_concurrency or 'default'}) on "
                f"127.0.0.1:{server.port} ({os.cpu_count()} CPUs, shared with the clients); "
                f"{args.workers} Procfile workers; {args.concurrency} clients ("
                + ("wrk, 2 threads" if args.load == "wrk" else f"{args.client_processes} processes")
                + f"), {args.warmup:g} s warm-up + "
                f"{args.duration:g} s per endpoint",
                flush=True,
            )
            options = {
                "concurrency": args.concurrency,
                "processes": args.client_processes,
                "warmup": args.warmup,
                "duration": args.duration,
            }
            results = {}
            for target in (health, trigger):
                wait_until_quiet(args.quiet_wait)
                assert server.proc is not None
                before = cpu_seconds(args.database_url, server.proc.pid, workers.pids)
                started = time.monotonic()
                driver = drive_wrk if args.load == "wrk" else drive
                results[target.name] = driver(server.port, target, **options)
                # The whole phase (start-up, warm-up, window): the clients' CPU is only
                # known once their processes have exited.
                after = cpu_seconds(args.database_url, server.proc.pid, workers.pids)
                cpu = cpu_split(before, after, time.monotonic() - started)
                results[target.name]["cpu_core_seconds"] = cpu
                report(results[target.name])
                print(cpu_line(cpu, results[target.name]["answered_in_phase"]), flush=True)
                if args.workers:
                    waiting = queued_jobs(args)
                    results[target.name]["jobs_waiting_after"] = waiting
                    print(f"  jobs still queued at the end of the phase: {waiting:,}", flush=True)
                    if waiting:
                        results[target.name]["drain"] = drain(args, server.proc.pid, workers)
        finally:
            workers.stop()
            server.stop()
    accepted = results["trigger"]["statuses"].get("202", 0)
    created, statements = count_send_requests(args, org_id)
    ratio = results["trigger"]["rps"] / results["health"]["rps"]
    p99 = results["trigger"]["p99_ms"]
    print(
        f"send requests written: {created:,} (202 answers in the window: {accepted:,}) "
        f"by {statements:,} statements ({created / max(statements, 1):.2f} per statement)"
    )
    print(
        f"ratio trigger/health: {ratio:.2f} (goal >= {GOAL_RATIO:.2f}: "
        f"{'met' if ratio >= GOAL_RATIO else 'NOT met'}); trigger p99 {p99:.1f} ms "
        f"(goal < {GOAL_P99_MS:g} ms: {'met' if p99 < GOAL_P99_MS else 'NOT met'})"
    )
    # What the ratio would be if the machine were the bench's alone: CPU per request of
    # everything the bench runs (a disturbed run inflates both a little).
    cost = {
        name: cpu_ours(r["cpu_core_seconds"]) / max(1, r["answered_in_phase"])
        for name, r in results.items()
    }
    cpu_ratio = cost["health"] / cost["trigger"]
    print(
        f"CPU per request, all the bench's processes: health {cost['health'] * 1000:.2f} ms, "
        f"trigger {cost['trigger'] * 1000:.2f} ms; ratio health/trigger {cpu_ratio:.2f} "
        "(the throughput ratio an undisturbed, CPU-bound run would show)"
    )
    print(json.dumps({"results": results, "ratio": ratio, "cpu_ratio": cpu_ratio}, default=str))


if __name__ == "__main__":
    main()
