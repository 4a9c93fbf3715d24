"""Realtime: N WebSockets on one web process, one broadcast to all, single-send latency.

Starts one production web process (``gunicorn -c gunicorn.conf.py wsgi:app`` with
``WEB_CONCURRENCY=1`` and the worker class under test) and two ``whistle worker --simple``
processes on the bench's own database and Redis database, seeds an organization with N
recipients, and opens N sockets to ``/ws`` from client processes (asyncio + ``websockets``),
each authenticated as its own recipient. Then, for each N:

1. **connect**: how many sockets reached ``ready``, how long that took, and the web
   process's resident memory (RSS, master and worker) with all of them open;
2. **broadcast**: an in-app campaign to all N recipients is launched; the time from the
   launch until every connected client has received its ``notification`` frame;
3. **single sends** (``--singles``, at ``--single-rate`` per second): ``POST
   /api/v1/notifications`` to one random connected recipient; the time from sending the
   request until that recipient's socket has the frame (p50/p99).

Goals (issue 5): 10,000 sockets, all delivered within 3 s of the launch, under 1.5 GiB RSS
in total; p99 trigger-to-arrival under 100 ms at 1,000 sockets.

    .venv/bin/python bench/realtime.py                                   # 1,000 and 10,000, gevent
    .venv/bin/python bench/realtime.py --sockets 1000 --worker-class gthread
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
import asyncio  # noqa: E402
import collections  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench.api import Gunicorn, local_url, percentile  # noqa: E402
from bench.broadcast import (  # noqa: E402
    Workers,
    add_in_app_provider,
    copy_recipients,
    make_organization,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/whistle_bench_realtime"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/2"
CONTENT = {
    "in_app": {
        "title": "{{ data.kind }}",
        "body": "{{ data.marker }}",
        "action_url": "https://example.com/news",
    }
}
GOAL_SOCKETS = 10_000
GOAL_BROADCAST_S = 3.0
GOAL_RSS_BYTES = 1.5 * 1024**3
GOAL_P99_MS = 100.0


# --- client processes --------------------------------------------------------------------


async def _client_main(
    url: str, tokens: list[tuple[str, str]], inbox: Any, commands: Any, connect_parallel: int
) -> None:
    import websockets

    ready = 0
    failed = 0
    errors: collections.Counter[str] = collections.Counter()
    arrivals: list[tuple[str, str, float]] = []  # (external id, marker, arrival time)
    sockets: list[Any] = []
    gate = asyncio.Semaphore(connect_parallel)

    async def listen(external_id: str, ws: Any) -> None:
        try:
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("type") == "notification":
                    arrivals.append((external_id, frame.get("body", ""), time.time()))
        except websockets.ConnectionClosed:
            pass

    async def connect(external_id: str, token: str) -> None:
        nonlocal ready, failed
        async with gate:
            try:
                ws = await websockets.connect(url, open_timeout=30, max_size=2**20)
                await ws.send(json.dumps({"type": "auth", "token": token}))
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if frame.get("type") == "ready":
                        break
            except Exception as error:  # counted: the bench reports how many did not connect
                failed += 1
                errors[f"{type(error).__name__}: {error}"[:120]] += 1
                return
        ready += 1
        sockets.append(ws)
        asyncio.get_running_loop().create_task(listen(external_id, ws))

    started = time.time()
    await asyncio.gather(*(connect(e, t) for e, t in tokens))
    inbox.put(("connected", ready, failed, time.time() - started, dict(errors)))
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, commands.get)
        if command == "report":
            inbox.put(("arrivals", arrivals[:]))
            arrivals.clear()
        elif command == "stop":
            break
    for ws in sockets:
        await ws.close()


def client_process(
    url: str, tokens: list[tuple[str, str]], inbox: Any, commands: Any, parallel: int
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    asyncio.run(_client_main(url, tokens, inbox, commands, parallel))


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the server side ---------------------------------------------------------------------


def rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and its children (the gunicorn master and workers)."""
    total = 0
    for pid in process_tree(root_pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            continue
    return total


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(root_pid: int) -> list[int]:
    pids = [root_pid]
    children_file = Path(f"/proc/{root_pid}/task/{root_pid}/children")
    if children_file.exists():
        pids += [int(p) for p in children_file.read_text().split()]
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time these processes have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time every core spent busy so far (not idle, not waiting for I/O)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def post_json(port: int, path: str, body: dict[str, Any], key: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST",
            path,
            body=json.dumps(body),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log_dir = Path(tempfile.mkdtemp(prefix="whistle-bench-realtime-"))

    # data

    def seed(self, count: int) -> tuple[int, list[tuple[str, str]], str]:
        """An organization, ``count`` recipients, a token for each, and an API key."""
        from whistle_web import create_app, get_redis
        from whistle_web.accounts.services import create_api_key
        from whistle_web.errors import Actor
        from whistle_web.extensions import db
        from whistle_web.preferences.services import issue_recipient_token
        from whistle_web.tenancy import organization_scope

        app = create_app()
        with app.app_context():
            get_redis().flushdb()
            org_id, _ = make_organization(f"bench-realtime-{time.time_ns()}", CONTENT)
            add_in_app_provider(org_id)
            copy_recipients(org_id, count)
            with organization_scope(org_id):
                key = create_api_key("bench", actor=Actor.system("bench")).secret
                db.session.commit()
                tokens = [
                    (f"u{i}", issue_recipient_token(org_id, f"u{i}")[0]) for i in range(count)
                ]
            db.engine.dispose()
        self.app = app
        return org_id, tokens, key

    def launch_broadcast(self, org_id: int) -> float:
        from whistle_web.campaigns.models import AudienceType
        from whistle_web.campaigns.services import create_campaign, launch_campaign
        from whistle_web.errors import Actor
        from whistle_web.tenancy import organization_scope

        actor = Actor.system("bench")
        with self.app.app_context(), organization_scope(org_id):
            campaign = create_campaign(
                "broadcast",
                template_key="bench",
                channels=["in_app"],
                audience_type=AudienceType.ALL,
                data={"kind": "broadcast", "marker": "broadcast"},
                actor=actor,
            )
            started = time.time()
            launch_campaign(campaign.id, actor=actor)
        return started

    # clients

    def start_clients(self, url: str, tokens: list[tuple[str, str]]) -> None:
        ctx = mp.get_context("spawn")
        self.inbox = ctx.Queue()
        self.commands = []
        self.clients = []
        n = max(1, min(self.args.client_processes, len(tokens)))
        for i in range(n):
            commands = ctx.Queue()
            proc = ctx.Process(
                target=client_process,
                args=(url, tokens[i::n], self.inbox, commands, self.args.connect_parallel),
                daemon=True,
            )
            proc.start()
            self.commands.append(commands)
            self.clients.append(proc)

    def gather(self, kind: str, timeout: float = 600) -> list[Any]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < len(self.clients):
            message = self.inbox.get(timeout=max(1, deadline - time.monotonic()))
            if message[0] == kind:
                out.append(message[1:])
        return out

    def arrivals(self) -> list[tuple[str, str, float]]:
        for commands in self.commands:
            commands.put("report")
        return [a for (batch,) in self.gather("arrivals") for a in batch]

    def stop_clients(self) -> None:
        for commands in self.commands:
            commands.put("stop")
        for proc in self.clients:
            proc.join(30)
            if proc.is_alive():
                proc.kill()

    # one run

    def run(self, count: int) -> dict[str, Any]:
        org_id, tokens, key = self.seed(count)
        web = Gunicorn(self.gunicorn_args(), self.log_dir / f"web-{count}.log")
        web.start()
        port = web.port
        from redis import Redis

        redis = Redis.from_url(self.args.redis_url)
        workers = Workers(2, simple=True, log_dir=self.log_dir)
        workers.start(redis)
        try:
            idle_rss = rss_bytes(web.proc.pid)
            web_pids = process_tree(web.proc.pid)
            cpu_before = (cpu_seconds(web_pids), machine_busy_seconds(), time.monotonic())
            self.start_clients(f"ws://127.0.0.1:{port}/ws", tokens)
            client_pids = [p.pid for p in self.clients if p.pid is not None]
            connected = self.gather("connected")
            web_cpu = cpu_seconds(web_pids) - cpu_before[0]
            busy = machine_busy_seconds() - cpu_before[1]
            wall = time.monotonic() - cpu_before[2]
            clients_cpu = cpu_seconds(client_pids)  # they started with this phase
            ready = sum(c[0] for c in connected)
            failed = sum(c[1] for c in connected)
            connect_s = max(c[2] for c in connected)
            errors: collections.Counter[str] = collections.Counter()
            for c in connected:
                errors.update(c[3])
            time.sleep(1.0)  # let the server settle before reading its memory
            rss = rss_bytes(web.proc.pid)
            result: dict[str, Any] = {
                "sockets": count,
                "worker_class": self.args.worker_class,
                "ready": ready,
                "failed": failed,
                "connect_seconds": round(connect_s, 2),
                "connect_per_second": round(ready / connect_s, 1) if connect_s else None,
                # CPU while the clients started and connected (cores x seconds, and the
                # share of the machine's 2 cores x the phase's wall time).
                "connect_cpu": {
                    "wall_seconds": round(wall, 2),
                    "web_seconds": round(web_cpu, 2),
                    "clients_seconds": round(clients_cpu, 2),
                    "everything_else_seconds": round(max(0.0, busy - web_cpu - clients_cpu), 2),
                    "machine_busy_share": round(busy / (wall * (os.cpu_count() or 1)), 3),
                },
                "connect_errors": dict(errors.most_common(5)),
                "rss_bytes_idle": idle_rss,
                "rss_bytes_connected": rss,
            }
            started = self.launch_broadcast(org_id)
            deadline = time.monotonic() + self.args.broadcast_timeout
            got: dict[str, float] = {}
            while len(got) < ready and time.monotonic() < deadline:
                time.sleep(0.5)
                for external_id, marker, at in self.arrivals():
                    if marker == "broadcast":
                        got.setdefault(external_id, at)
            result["broadcast_received"] = len(got)
            result["broadcast_all_seconds"] = (
                round(max(got.values()) - started, 3) if len(got) == ready and got else None
            )
            if got:
                result["broadcast_p50_seconds"] = round(
                    statistics.median(v - started for v in got.values()), 3
                )
            if self.args.singles and count <= self.args.singles_max_sockets:
                result["single"] = self.singles(port, key, [t[0] for t in tokens])
            return result
        finally:
            self.stop_clients()
            workers.stop()
            web.stop()

    def singles(self, port: int, key: str, external_ids: list[str]) -> dict[str, Any]:
        sent: dict[str, float] = {}
        answered: list[float] = []  # how long the API took to answer 202
        statuses: dict[int, int] = {}
        interval = 1.0 / self.args.single_rate
        next_at = time.monotonic()
        for i in range(self.args.singles):
            marker = f"single-{i}"
            body = {
                "template": "bench",
                "to": [random.choice(external_ids)],
                "data": {"kind": "single", "marker": marker},
            }
            sent[marker] = time.time()
            status = post_json(port, "/api/v1/notifications", body, key)
            answered.append((time.time() - sent[marker]) * 1000)
            statuses[status] = statuses.get(status, 0) + 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        time.sleep(2.0)
        latencies = []
        for _, marker, at in self.arrivals():
            if marker in sent:
                latencies.append((at - sent.pop(marker)) * 1000)
        latencies.sort()
        answered.sort()
        return {
            "api_p50_ms": round(percentile(answered, 0.50), 1),
            "api_p99_ms": round(percentile(answered, 0.99), 1),
            "sent": self.args.singles,
            "received": len(latencies),
            "statuses": statuses,
            "p50_ms": round(percentile(latencies, 0.50), 1) if latencies else None,
            "p99_ms": round(percentile(latencies, 0.99), 1) if latencies else None,
            "max_ms": round(latencies[-1], 1) if latencies else None,
        }

    def gunicorn_args(self) -> argparse.Namespace:
        os.environ["WHISTLE_WEB_WORKER_CLASS"] = self.args.worker_class
        os.environ["WHISTLE_WS_MAX_SOCKETS_PER_RECIPIENT"] = "10"
        return argparse.Namespace(
            database_url=self.args.database_url,
            redis_url=self.args.redis_url,
            web_concurrency=1,
            worker_class=self.args.worker_class,
        )


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", default="1000,10000", help="comma-separated N values")
    parser.add_argument("--worker-class", choices=("gevent", "gthread"), default="gevent")
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument(
        "--connect-parallel",
        type=int,
        default=50,
        help="connections opening at once per client process",
    )
    parser.add_argument("--broadcast-timeout", type=float, default=60.0)
    parser.add_argument("--singles", type=int, default=200, help="single sends to time")
    parser.add_argument("--single-rate", type=float, default=20.0, help="single sends per second")
    parser.add_argument(
        "--singles-max-sockets", type=int, default=1000, help="time single sends up to this N"
    )
    parser.add_argument(
        "--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--keep", action="store_true", help="keep the bench database at the end")
    args = parser.parse_args(argv)
    local_url(args.database_url, "--database-url")
    local_url(args.redis_url, "--redis-url")
    return args


def report(result: dict[str, Any]) -> None:
    n = result["sockets"]
    rss = result["rss_bytes_connected"] / 1024**2
    if result["connect_errors"]:
        print(f"  connect errors: {result['connect_errors']}")
    print(
        f"{n:,} sockets ({result['worker_class']}): {result['ready']:,} ready, "
        f"{result['failed']:,} failed, in {result['connect_seconds']:.1f} s; web RSS "
        f"{result['rss_bytes_idle'] / 1024**2:.0f} MiB idle, {rss:.0f} MiB connected"
    )
    cpu = result["connect_cpu"]
    print(
        f"  connect + auth: {result['connect_per_second']} sockets/s; CPU during it "
        f"({cpu['wall_seconds']:.1f} s): web {cpu['web_seconds']:.1f} s, clients "
        f"{cpu['clients_seconds']:.1f} s, everything else {cpu['everything_else_seconds']:.1f} s "
        f"(PostgreSQL, Redis, other users); machine {cpu['machine_busy_share']:.0%} busy"
    )
    all_s = result.get("broadcast_all_seconds")
    print(
        f"  broadcast: {result['broadcast_received']:,}/{result['ready']:,} received; all within "
        + (f"{all_s:.2f} s" if all_s is not None else "— (not all arrived)")
        + f" of the launch (median {result.get('broadcast_p50_seconds', '—')} s)"
    )
    if n >= GOAL_SOCKETS:
        met = (
            result["ready"] >= GOAL_SOCKETS
            and all_s is not None
            and all_s <= GOAL_BROADCAST_S
            and result["rss_bytes_connected"] <= GOAL_RSS_BYTES
        )
        print(
            f"  goal ({GOAL_SOCKETS:,} sockets, all within {GOAL_BROADCAST_S:g} s, "
            f"RSS < 1.5 GiB): {'met' if met else 'NOT met'}"
        )
    single = result.get("single")
    if single:
        print(
            f"  single sends: {single['received']}/{single['sent']} arrived, trigger-to-arrival "
            f"p50 {single['p50_ms']} ms p99 {single['p99_ms']} ms max {single['max_ms']} ms "
            f"(the API's 202 itself: p50 {single['api_p50_ms']} ms p99 {single['api_p99_ms']} ms; "
            f"statuses {single['statuses']})"
        )
        if n <= 1000 and single["p99_ms"] is not None:
            met = single["p99_ms"] < GOAL_P99_MS
            print(f"  goal (p99 < {GOAL_P99_MS:g} ms at 1,000): {'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    raise_fd_limit()
    os.environ.update(DATABASE_URL=args.database_url, REDIS_URL=args.redis_url)
    os.environ.setdefault("WHISTLE_LOG_LEVEL", "WARNING")
    from bench.api import drop_database, recreate_database

    results = []
    for count in (int(n) for n in args.sockets.split(",")):
        recreate_database(args)
        bench = Bench(args)
        result = bench.run(count)
        report(result)
        results.append(result)
    if not args.keep:
        drop_database(args.database_url)
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
