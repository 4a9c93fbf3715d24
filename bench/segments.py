"""Counting a three-condition segment over N recipients: before and after its indexes.

The segment is the console's typical live-typing case::

    plan = 'pro'  AND  country in [DE, FR, NL]  AND  created in the last 90 days

N recipients (1,000,000 by default) of one organization are seeded with COPY: a fifth on
each of five plans, ten countries, sign-up dates spread over three years (so the segment
matches about 0.2 x 0.3 x 0.08 of them), plus seats and a beta flag. Three variants of the
count run inside the organization's scope, as the console runs it (median of ``--runs``
runs after one warm-up run each):

- **before**: the rules as the compiler wrote them before the segment builder (text
  comparisons ``attributes->>'plan' = 'pro' AND attributes ? 'plan'``, which no index serves)
  and no index on ``created_at``;
- **containment**: today's compiler (equality as ``attributes @> '{"plan": "pro"}'``, served
  by the GIN ``jsonb_path_ops`` index), still without the ``created_at`` index;
- **after**: today's compiler with migration 0006's ``(organization_id, created_at)`` index.

Then (unless ``--no-engagement``) every fifth recipient gets a delivery of one campaign
(sent over the last 60 days, a third opened, a tenth clicked) and two engagement segments
are counted the same way, with their plans printed.

The goal is under 300 ms. The bench uses its own database (``whistle_bench_segments``,
recreated at start and dropped at the end unless ``--keep``) and touches no Redis data.

    .venv/bin/python bench/segments.py                       # 1,000,000 recipients
    .venv/bin/python bench/segments.py --recipients 200000   # a quick run
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
import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

from bench.broadcast import (  # noqa: E402
    drop_database,
    recreate_database,
    setup_services,
    wait_until_quiet,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/whistle_bench_segments"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/6"
GOAL_MS = 300.0
PLANS = ("pro", "team", "free", "starter", "enterprise")
COUNTRIES = ("DE", "FR", "NL", "US", "GB", "ES", "IT", "PL", "SE", "BR")
CHOSEN = ["DE", "FR", "NL"]
SPREAD_DAYS = 3 * 365
RULES = {
    "op": "and",
    "rules": [
        {"field": "attributes.plan", "operator": "eq", "value": "pro"},
        {"field": "attributes.country", "operator": "in", "value": CHOSEN},
        {"field": "created_at", "operator": "in_last_days", "value": 90},
    ],
}
SEGMENT_INDEXES = ("ix_recipients_attributes", "ix_recipients_org_created")


def seed(org_id: int, count: int, now: datetime) -> float:
    """COPY ``count`` recipients; returns the seconds it took."""
    from whistle_web.extensions import db

    started = time.perf_counter()
    rng = random.Random(20261124)  # the same rows every run
    raw = db.session.connection().connection.driver_connection
    columns = "organization_id, external_id, email, locale, timezone, attributes, created_at"
    with raw.cursor() as cursor, cursor.copy(f"COPY recipients ({columns}) FROM STDIN") as copy:
        for start in range(0, count, 50_000):
            buffer = io.StringIO()
            for i in range(start, min(count, start + 50_000)):
                attributes = json.dumps(
                    {
                        "plan": rng.choice(PLANS),
                        "country": rng.choice(COUNTRIES),
                        "seats": rng.randrange(50),
                        "beta": rng.random() < 0.15,
                    }
                )
                created = now - timedelta(seconds=rng.randrange(SPREAD_DAYS * 86400))
                buffer.write(
                    f"{org_id}\tu{i}\tuser{i}@example.com\ten\tEurope/Berlin\t"
                    f"{attributes}\t{created.isoformat()}\n"
                )
            copy.write(buffer.getvalue())
    db.session.commit()
    return time.perf_counter() - started


def execute_ddl(statement: str) -> float:
    from sqlalchemy import text

    from whistle_web.extensions import db

    started = time.perf_counter()
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(statement))
    return time.perf_counter() - started


def old_condition(now: datetime) -> Any:
    """The condition the compiler wrote for these rules before the builder's work."""
    from sqlalchemy import and_

    from whistle_web.recipients.models import Recipient

    attributes = Recipient.attributes
    return and_(
        and_(attributes.has_key("plan"), attributes["plan"].astext == "pro"),
        and_(attributes.has_key("country"), attributes["country"].astext.in_(CHOSEN)),
        and_(Recipient.created_at.is_not(None), Recipient.created_at >= now - timedelta(days=90)),
    )


def timed_counts(org_id: int, condition: Callable[[], Any], runs: int) -> dict[str, Any]:
    """One warm-up count, then ``runs`` timed ones (milliseconds), each in its own
    transaction as a console request would run it."""
    from sqlalchemy import func, select

    from whistle_web.extensions import db
    from whistle_web.recipients.models import Recipient
    from whistle_web.tenancy import organization_scope

    times, count = [], 0
    with organization_scope(org_id):
        for run in range(runs + 1):
            stmt = select(func.count()).select_from(Recipient).where(condition())
            started = time.perf_counter()
            count = int(db.session.scalar(stmt) or 0)
            elapsed = (time.perf_counter() - started) * 1000
            db.session.rollback()
            if run:
                times.append(elapsed)
        # EXPLAIN runs outside the ORM's tenant criteria: spell the organization out.
        plan = explain(
            select(func.count())
            .select_from(Recipient)
            .where(Recipient.organization_id == org_id, condition())
        )
    return {"median_ms": statistics.median(times), "runs_ms": times, "count": count, "plan": plan}


def explain(stmt: Any) -> list[str]:
    """The plan's node lines (scans and joins), for the report."""
    from sqlalchemy.ext.compiler import compiles
    from sqlalchemy.sql.expression import ClauseElement, Executable

    from whistle_web.extensions import db

    class Explain(Executable, ClauseElement):
        inherit_cache = False

        def __init__(self, statement: Any) -> None:
            self.statement = statement

    @compiles(Explain)
    def _explain(element: Explain, compiler: Any, **kw: Any) -> str:
        return "EXPLAIN " + compiler.process(element.statement, **kw)

    rows = db.session.connection().execute(Explain(stmt)).scalars().all()
    db.session.rollback()
    keep = ("Scan", "Bitmap", "Gather", "Aggregate", "Join", "Filter", "Cond")
    return [row.strip() for row in rows if any(k in row for k in keep)]


ENGAGEMENT_RULES = {
    "opened a campaign": {
        "op": "and",
        "rules": [
            {"field": "attributes.plan", "operator": "eq", "value": "pro"},
            {"engagement": "opened", "operator": "did", "campaign_id": 1, "days": 30},
        ],
    },
    "clicked any message": {
        "op": "and",
        "rules": [
            {"engagement": "clicked", "operator": "did", "campaign_id": None, "days": 7},
            {"field": "attributes.country", "operator": "eq", "value": "DE"},
        ],
    },
}


def seed_deliveries(org_id: int) -> tuple[int, float]:
    """One campaign's email to every fifth recipient: sent over the last 60 days, a third
    opened, a tenth clicked. Returns (rows, seconds)."""
    from sqlalchemy import text

    from bench.broadcast import IN_APP_CONTENT
    from whistle_web.extensions import db
    from whistle_web.models import (
        SendRequest,
        SendRequestKind,
        Template,
        TemplateVersion,
        VersionState,
    )
    from whistle_web.tenancy import organization_scope

    started = time.perf_counter()
    with organization_scope(org_id):
        template = Template(key="bench", name="Bench")
        db.session.add(template)
        db.session.flush()
        version = TemplateVersion(
            template_id=template.id, version=1, state=VersionState.PUBLISHED, content=IN_APP_CONTENT
        )
        db.session.add(version)
        db.session.flush()
        request = SendRequest(
            kind=SendRequestKind.TRIGGER,
            template_id=template.id,
            template_version_id=version.id,
            audience={"type": "all"},
        )
        db.session.add(request)
        db.session.flush()
        params = {"org": org_id, "request": request.id, "template": template.id}
        db.session.execute(
            text(
                "INSERT INTO notifications (id, organization_id, send_request_id, campaign_id,"
                " template_id, recipient_id) SELECT id, :org, :request, 1, :template, id"
                " FROM recipients WHERE id % 5 = 0"
            ),
            params,
        )
        rows = db.session.execute(
            text(
                "INSERT INTO deliveries (organization_id, notification_id, recipient_id,"
                " campaign_id, template_id, channel, status, sent_at, seen_at, clicked_at)"
                " SELECT :org, id, id, 1, :template, 'email', 'sent', s, "
                " CASE WHEN id % 3 = 0 THEN s + interval '1 hour' END,"
                " CASE WHEN id % 10 = 0 THEN s + interval '2 hours' END"
                " FROM (SELECT id, now() - (id % 60) * interval '1 day' AS s"
                " FROM recipients WHERE id % 5 = 0) AS r"
            ),
            params,
        ).rowcount
        db.session.commit()
    execute_ddl("ANALYZE notifications")
    execute_ddl("ANALYZE deliveries")
    return rows, time.perf_counter() - started


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    parser.add_argument(
        "--no-engagement",
        dest="engagement",
        action="store_false",
        help="skip the engagement conditions (deliveries of every fifth recipient)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_services(args)
    recreate_database(args.database_url)
    if not args.keep:
        atexit.register(drop_database, args.database_url)
    from whistle_web import create_app
    from whistle_web.audiences.segments import compile_rules
    from whistle_web.organizations.services import create_organization

    now = datetime.now(UTC)
    app = create_app()
    with app.app_context():
        org_id = create_organization("Segments bench").id
        from whistle_web.extensions import db

        db.session.commit()
        for name in SEGMENT_INDEXES:  # built after the COPY, as a bulk load would
            execute_ddl(f"DROP INDEX {name}")
        seconds = seed(org_id, args.recipients, now)
        print(f"seeded {args.recipients:,} recipients in {seconds:.1f} s (COPY)")
        vacuum = execute_ddl("VACUUM ANALYZE recipients")
        print(f"VACUUM ANALYZE in {vacuum:.1f} s")

        results = {}
        wait_until_quiet(args.quiet_wait)
        results["before"] = timed_counts(org_id, lambda: old_condition(now), args.runs)
        gin = execute_ddl(
            "CREATE INDEX ix_recipients_attributes ON recipients "
            "USING gin (attributes jsonb_path_ops)"
        )
        print(f"built the GIN (jsonb_path_ops) index in {gin:.1f} s")
        execute_ddl("ANALYZE recipients")
        wait_until_quiet(args.quiet_wait)
        results["containment"] = timed_counts(
            org_id, lambda: compile_rules(RULES, now=now), args.runs
        )
        btree = execute_ddl(
            "CREATE INDEX ix_recipients_org_created ON recipients (organization_id, created_at)"
        )
        print(f"built the (organization_id, created_at) index in {btree:.1f} s")
        execute_ddl("ANALYZE recipients")
        wait_until_quiet(args.quiet_wait)
        results["after"] = timed_counts(org_id, lambda: compile_rules(RULES, now=now), args.runs)
        engagement = {}
        if args.engagement:
            rows, seconds = seed_deliveries(org_id)
            print(f"seeded {rows:,} deliveries of one campaign in {seconds:.1f} s")
            wait_until_quiet(args.quiet_wait)
            for name, rules in ENGAGEMENT_RULES.items():
                engagement[name] = timed_counts(
                    org_id, lambda rules=rules: compile_rules(rules, now=now), args.runs
                )

    counts = {r["count"] for r in results.values()}
    assert len(counts) == 1, f"the variants disagree: {results}"
    print(f"\nsegment: {json.dumps(RULES)}")
    print(f"matches {counts.pop():,} of {args.recipients:,} recipients\n")
    labels = {
        "before": "before: text comparisons, no created_at index",
        "containment": "JSONB containment (GIN), no created_at index",
        "after": "after: containment + (organization_id, created_at) index",
    }
    for key, result in results.items():
        runs = ", ".join(f"{t:.0f}" for t in result["runs_ms"])
        verdict = "meets" if result["median_ms"] < GOAL_MS else "misses"
        print(
            f"{labels[key]:<58} median {result['median_ms']:7.1f} ms "
            f"({verdict} the {GOAL_MS:.0f} ms goal; "
            f"goal/median {GOAL_MS / result['median_ms']:.2f}) "
            f"runs: {runs}"
        )
        for line in result["plan"]:
            print(f"    {line}")
    speedup = results["before"]["median_ms"] / results["after"]["median_ms"]
    print(f"\nbefore/after: {speedup:.1f}x faster")
    for name, result in engagement.items():
        print(
            f"\nengagement, {name}: {json.dumps(ENGAGEMENT_RULES[name])}\n"
            f"  matches {result['count']:,}; median {result['median_ms']:.1f} ms "
            f"(runs: {', '.join(f'{t:.0f}' for t in result['runs_ms'])})"
        )
        for line in result["plan"]:
            print(f"    {line}")


if __name__ == "__main__":
    main()
