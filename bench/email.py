"""Email campaigns through real workers to a local SMTP sink, with and without a rate limit.

Runs against the bench's own database and Redis database (as bench/broadcast.py does) and an
SMTP sink on 127.0.0.1 (``python -m tests.smtp_sink PORT LOGFILE``, one process per run,
which logs each received Message-ID):

- **rate limit off**: a campaign to ``--messages`` recipients; messages/s from the launch
  until the campaign completes (planning included), and between the first and the last
  message the sink received;
- **rate limit on**: a campaign to ``--limited-messages`` recipients through a provider with
  ``rate_limit_per_second = --rate``; the rate the sink saw, over the whole run and after
  the token bucket's initial burst, against the configured rate.

``tests/smtp_sink.py`` parses every message it receives in full (about 1 ms of CPU a message
here, so it tops out near 1,000 messages/s on a core of its own); ``--sink light`` runs an
aiosmtpd sink from this file that only reads the Message-ID, to see what Whistle itself does.

Both runs check that the sink got every message exactly once and that the ledger and the
funnel counters agree.

    .venv/bin/python bench/email.py
    .venv/bin/python bench/email.py --messages 5000 --rate 200 --limited-messages 2400
    .venv/bin/python bench/email.py --sink light --workers 4 --skip-limited
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This file is named like the standard library's email package: never let ``bench/`` be on
# sys.path (``python bench/email.py`` puts it first), or ``import email`` finds this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

from bench.broadcast import (  # noqa: E402
    DEFAULT_REDIS_URL,
    Workers,
    bench_app,
    copy_recipients,
    cpu_line,
    cpu_seconds,
    exit_on_sigterm,
    make_organization,
    service_env,
    verify,
    wait_for,
    wait_until_quiet,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/whistle_bench_email"
EMAIL_CONTENT = {
    "email": {
        "subject": "News for {{ recipient.name or 'you' }}",
        "text": "Hi {{ recipient.name }},\n\n{{ data.headline }}.\n\nThe Acme team",
        "html": "<p>Hi {{ recipient.name }},</p><p>{{ data.headline }}: "
        "<a href='https://example.com/whats-new'>see what is new</a>.</p>",
    }
}
CAMPAIGN_DATA = {"headline": "Dark mode is here"}


class _LightHandler:
    """Accept everything; log each Message-ID (read from the headers, nothing parsed)."""

    def __init__(self, log_path: Path) -> None:
        self.log = log_path.open("ab")

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        head = envelope.content.split(b"\r\n\r\n", 1)[0]
        found = re.search(rb"(?im)^message-id:[ \t]*(\S+)", head)
        self.log.write((found.group(1) if found else b"-") + b"\n")
        self.log.flush()
        return "250 Message accepted"


def serve_light_sink(port: int, log_path: Path) -> None:
    from aiosmtpd.controller import Controller

    controller = Controller(_LightHandler(log_path), hostname="127.0.0.1", port=port)
    controller.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


class Sink:
    """An SMTP sink in its own process; counts what it logged, with arrival times."""

    def __init__(self, log_dir: Path, name: str, *, light: bool = False) -> None:
        from tests.smtp_sink import free_port

        self.port = free_port()
        self.log = log_dir / f"{name}.log"
        self.log.touch()
        output = (log_dir / f"{name}.out").open("wb")
        if light:
            command = [sys.executable, str(Path(__file__).resolve()), "--serve-light-sink"]
        else:
            command = [sys.executable, "-m", "tests.smtp_sink"]
        self.proc = subprocess.Popen(
            [*command, str(self.port), str(self.log)],
            cwd=ROOT,
            env=service_env(os.environ["DATABASE_URL"], os.environ["REDIS_URL"]),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        atexit.register(self.stop)
        self.arrivals: list[tuple[float, int]] = []  # (monotonic time, messages so far)
        self._wait_listening()

    def _wait_listening(self) -> None:
        import socket

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the SMTP sink exited: see {self.log.with_suffix('.out')}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise SystemExit("the SMTP sink did not start listening")

    def count(self) -> int:
        with self.log.open("rb") as log:
            return log.read().count(b"\n")

    def poll(self) -> int:
        n = self.count()
        if not self.arrivals or self.arrivals[-1][1] != n:
            self.arrivals.append((time.monotonic(), n))
        return n

    def message_ids(self) -> Counter[str]:
        return Counter(line.strip() for line in self.log.read_text().splitlines() if line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def add_smtp_provider(org_id: int, port: int, rate: float | None) -> None:
    from whistle_web.channels.kinds import Channel, ProviderKind
    from whistle_web.extensions import db
    from whistle_web.models import Provider
    from whistle_web.tenancy import organization_scope

    with organization_scope(org_id):
        provider = Provider(
            channel=Channel.EMAIL,
            kind=ProviderKind.SMTP,
            name="Sink",
            rate_limit_per_second=rate,
            settings={
                "host": "127.0.0.1",
                "port": port,
                "use_tls": "none",
                "from_email": "news@acme.example.com",
                "from_name": "Acme",
            },
        )
        provider.set_credentials({})
        db.session.add(provider)
        db.session.commit()


def run_campaign(
    name: str,
    recipients: int,
    rate: float | None,
    sink: Sink,
    workers: Workers,
    quiet_wait: float,
) -> dict[str, Any]:
    """Seed an organization, launch an email campaign to everyone, wait for the sink."""
    from sqlalchemy import select

    from whistle_web.campaigns.models import Campaign, CampaignStatus
    from whistle_web.campaigns.services import create_campaign, launch_campaign
    from whistle_web.errors import Actor
    from whistle_web.extensions import db
    from whistle_web.tenancy import organization_scope

    org_id, _ = make_organization(f"{name}-{time.time_ns()}", EMAIL_CONTENT)
    add_smtp_provider(org_id, sink.port, rate)
    copy_recipients(org_id, recipients, email=True)
    db.session.commit()
    actor = Actor.system("bench")
    with organization_scope(org_id):
        campaign_id = create_campaign(
            name,
            template_key="bench",
            channels=["email"],
            audience_type="all",
            data=CAMPAIGN_DATA,
            actor=actor,
        ).id

    def completed() -> bool:
        sink.poll()
        with organization_scope(org_id):
            status = db.session.scalar(select(Campaign.status).where(Campaign.id == campaign_id))
        return status in (CampaignStatus.COMPLETED, CampaignStatus.FAILED)

    wait_until_quiet(quiet_wait)
    pids = {p.pid for p in workers.procs}
    cpu_before = cpu_seconds(pids)
    start = time.monotonic()
    with organization_scope(org_id):
        launch_campaign(campaign_id, actor=actor)
    wait_for(completed, timeout=3600, poll=0.02)
    seconds = time.monotonic() - start
    cpu = {k: v - cpu_before[k] for k, v in cpu_seconds(pids).items()}
    sink.poll()
    verify(org_id, campaign_id, recipients)
    ids = sink.message_ids()
    if len(ids) != recipients or max(ids.values()) != 1:
        raise SystemExit(
            f"the sink got {sum(ids.values())} messages, {len(ids)} distinct, for {recipients}"
        )
    return {"recipients": recipients, "seconds": seconds, "arrivals": sink.arrivals, "cpu": cpu}


def arrival_rate(arrivals: list[tuple[float, int]], skip: int = 0) -> tuple[float, float]:
    """(messages/s, seconds) between the arrival of message ``skip + 1`` and the last one."""
    first = next((t, n) for t, n in arrivals if n > skip)
    last = arrivals[-1]
    seconds = last[0] - first[0]
    return (last[1] - first[1]) / seconds if seconds > 0 else float("nan"), seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="rate limit off")
    parser.add_argument("--rate", type=float, default=200.0, help="messages/s when limited")
    parser.add_argument(
        "--limited-messages",
        type=int,
        default=None,
        help="messages with the rate limit on (default: 15 s worth at --rate)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-mode", choices=("simple", "fork"), default="simple")
    parser.add_argument(
        "--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--keep", action="store_true", help="keep the bench database at the end")
    parser.add_argument("--skip-unlimited", action="store_true")
    parser.add_argument("--skip-limited", action="store_true")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120,
        help="seconds to wait for an idle machine before each timed run (0: do not wait)",
    )
    parser.add_argument(
        "--sink",
        choices=("light", "tests"),
        default="light",
        help="a sink that only reads the Message-ID (default: the sink is not what is measured)"
        " or tests/smtp_sink.py, which parses every message",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-light-sink"]:
        serve_light_sink(int(argv[1]), Path(argv[2]))
        return
    args = parse_args(argv)
    limited = args.limited_messages or int(args.rate * 15)
    exit_on_sigterm()
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="whistle-bench-email-") as tmp, bench_app(args):
        from whistle_web import get_redis

        workers = Workers(args.workers, simple=args.worker_mode == "simple", log_dir=Path(tmp))
        workers.start(get_redis())
        try:
            if not args.skip_unlimited:
                sink = Sink(Path(tmp), "unlimited", light=args.sink == "light")
                try:
                    result = run_campaign(
                        "unlimited", args.messages, None, sink, workers, args.quiet_wait
                    )
                finally:
                    sink.stop()
                rate, span = arrival_rate(result["arrivals"])
                print(
                    f"email, rate limit off: {args.messages:,} messages, launch to completed "
                    f"{result['seconds']:.2f} s = {args.messages / result['seconds']:,.0f} "
                    f"messages/s; at the sink {rate:,.0f} messages/s over {span:.2f} s "
                    f"({workers.label}, {args.sink} sink)",
                    flush=True,
                )
                print(cpu_line(result["cpu"], result["seconds"]))
                summary["unlimited"] = {
                    "messages": args.messages,
                    "seconds": result["seconds"],
                    "per_second": args.messages / result["seconds"],
                    "sink_per_second": rate,
                }
            if not args.skip_limited:
                sink = Sink(Path(tmp), "limited", light=args.sink == "light")
                try:
                    result = run_campaign(
                        "limited", limited, args.rate, sink, workers, args.quiet_wait
                    )
                finally:
                    sink.stop()
                overall, span = arrival_rate(result["arrivals"])
                burst = max(1, int(args.rate / 10))  # the bucket starts full (ratelimit.py)
                steady, steady_span = arrival_rate(result["arrivals"], skip=burst)
                print(
                    f"email, rate limit {args.rate:g}/s: {limited:,} messages; at the sink "
                    f"{overall:.1f} messages/s over {span:.2f} s = "
                    f"{overall / args.rate:.4f} of the configured rate; after the initial "
                    f"burst of {burst}: {steady:.1f}/s over {steady_span:.2f} s = "
                    f"{steady / args.rate:.4f} ({workers.label}, {args.sink} sink)",
                    flush=True,
                )
                print(cpu_line(result["cpu"], result["seconds"]))
                summary["limited"] = {
                    "messages": limited,
                    "configured": args.rate,
                    "measured": overall,
                    "ratio": overall / args.rate,
                    "steady": steady,
                    "steady_ratio": steady / args.rate,
                    "seconds": span,
                }
        finally:
            workers.stop()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
