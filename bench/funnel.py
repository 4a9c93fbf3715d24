"""The console's funnel page for a campaign of 10,000,000 deliveries, against a 200 ms goal.

The funnel page reads only the ``delivery_stats`` counters, so the bench writes those rows
directly (what the pipeline's live counters would hold after such a campaign): the campaign,
its template and the organization each get hourly counters over ``--days`` days on four
channels for every funnel metric and suppression reason, summing to ``--deliveries``
targeted deliveries. Other campaigns' counters (``--noise-campaigns``) fill the table
around it. Then the page is rendered through the Flask test client as a signed-in viewer:
median of ``--runs`` renders after one warm-up, for

- the campaign's funnel (all channels, a daily series over 7 days),
- the same narrowed to one channel,
- the campaign compared with another one (``?compare=``),
- the CSV export,
- the top clicked links fragment, from the per-link click counters
  (``delivery_link_stats``) of ``--clicks`` clicks on ``--links`` links; the clicked
  deliveries and their events (plus as many of another campaign) are in the database too,
  and the counters are built from them by ``rebuild_link_stats`` (timed: the backfill).

The bench uses its own database (``whistle_bench_funnel``, recreated at start and dropped at
the end unless ``--keep``) and touches no Redis data.

    .venv/bin/python bench/funnel.py
    .venv/bin/python bench/funnel.py --deliveries 1000000 --clicks 20000   # a quick run
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
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

from bench.broadcast import (  # noqa: E402
    drop_database,
    recreate_database,
    setup_services,
    wait_until_quiet,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/whistle_bench_funnel"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/6"
GOAL_MS = 200.0
CHANNELS = ("email", "sms", "push", "in_app")
# Share of targeted deliveries reaching each metric.
SHARES = {
    "targeted": 1.0,
    "suppressed": 0.05,
    "suppressed:unsubscribed": 0.02,
    "suppressed:suppression_list": 0.01,
    "suppressed:preference": 0.01,
    "suppressed:no_address": 0.005,
    "suppressed:frequency_cap": 0.005,
    "queued": 0.95,
    "sent": 0.93,
    "delivered": 0.88,
    "seen": 0.5,
    "read": 0.3,
    "clicked": 0.1,
    "failed": 0.01,
    "failed:provider_rejected": 0.004,
    "failed:invalid_address": 0.003,
    "failed:gave_up": 0.002,
    "failed:template_error": 0.001,
    "bounced": 0.01,
    "bounced:hard_bounce": 0.008,
    "bounced:provider_suppressed": 0.002,
    "cancelled": 0.01,
    "archived": 0.05,
    "event:complaint": 0.0005,
    "event:unsubscribed": 0.001,
}
PASSWORD = "bench password 1234"  # noqa: S105 (a throwaway bench database)


def copy_counters(
    org_id: int, scopes: list[tuple[str, int]], deliveries: int, start: datetime, hours: int
) -> int:
    """COPY counter rows of one campaign-sized send for each (scope, id); returns rows."""
    from whistle_web.extensions import db

    per_cell = deliveries / (hours * len(CHANNELS))
    raw = db.session.connection().connection.driver_connection
    columns = "organization_id, scope, scope_id, channel, metric, bucket, value"
    rows = 0
    with raw.cursor() as cursor, cursor.copy(f"COPY delivery_stats ({columns}) FROM STDIN") as copy:
        for scope, scope_id in scopes:
            buffer = io.StringIO()
            for metric, share in SHARES.items():
                total = round(deliveries * share)
                written = 0
                cells = [(h, c) for h in range(hours) for c in CHANNELS]
                for index, (hour, channel) in enumerate(cells):
                    value = (
                        total - written
                        if index == len(cells) - 1
                        else min(round(per_cell * share), total - written)
                    )
                    written += value
                    if value <= 0:
                        continue
                    bucket = (start + timedelta(hours=hour)).isoformat()
                    buffer.write(
                        f"{org_id}\t{scope}\t{scope_id}\t{channel}\t{metric}\t{bucket}\t{value}\n"
                    )
                    rows += 1
            copy.write(buffer.getvalue())
    db.session.commit()
    return rows


def seed_clicks(
    org_id: int,
    request_id: int,
    campaign_id: int,
    template_id: int,
    clicks: int,
    start: datetime,
    days: int,
    link_count: int,
) -> None:
    """``clicks`` clicked deliveries of the campaign with one "clicked" event each, on
    ``links`` links; and as many of another campaign in the same window; then the campaign's
    and the template's clicks per link counted from them (what the live counters hold)."""
    from sqlalchemy import text

    from whistle_web.deliveries.services import rebuild_link_stats
    from whistle_web.extensions import db
    from whistle_web.models import StatScope
    from whistle_web.tenancy import organization_scope

    for campaign, links in ((campaign_id, link_count), (None, 5)):
        db.session.execute(
            text(
                "INSERT INTO notifications (organization_id, send_request_id, campaign_id,"
                " template_id, created_at) SELECT :org, :req, :campaign, :template,"
                " :start + (g % (:days * 24)) * interval '1 hour'"
                " FROM generate_series(1, :n) AS g"
            ),
            {
                "org": org_id,
                "req": request_id,
                "campaign": campaign,
                "template": template_id,
                "start": start,
                "days": days,
                "n": clicks,
            },
        )
        db.session.execute(
            text(
                "INSERT INTO deliveries (organization_id, notification_id, campaign_id,"
                " template_id, channel, status, created_at, sent_at, clicked_at)"
                " SELECT organization_id, id, campaign_id, template_id, 'email', 'clicked',"
                " created_at, created_at, created_at + interval '5 minutes'"
                " FROM notifications WHERE send_request_id = :req"
                " AND campaign_id IS NOT DISTINCT FROM :campaign"
            ),
            {"req": request_id, "campaign": campaign},
        )
        db.session.execute(
            text(
                "INSERT INTO delivery_events (organization_id, delivery_id, type, occurred_at,"
                " data) SELECT organization_id, id, 'clicked', clicked_at,"
                " jsonb_build_object('url', 'https://acme.test/link-' || (id % :links))"
                " FROM deliveries WHERE campaign_id IS NOT DISTINCT FROM :campaign"
                " AND status = 'clicked' AND organization_id = :org"
            ),
            {"campaign": campaign, "links": links, "org": org_id},
        )
    db.session.commit()
    with organization_scope(org_id):
        began = time.perf_counter()
        rows = rebuild_link_stats(StatScope.CAMPAIGN, campaign_id)
        rows += rebuild_link_stats(StatScope.TEMPLATE, template_id)
        db.session.commit()
    print(
        f"rebuild_link_stats (campaign and template, from the click events): {rows:,} rows"
        f" in {(time.perf_counter() - began) * 1000:.0f} ms"
    )


def setup(args: argparse.Namespace, now: datetime) -> dict[str, Any]:
    from sqlalchemy import text

    from whistle_web.accounts.models import Role
    from whistle_web.accounts.services import add_member, create_user
    from whistle_web.campaigns.models import AudienceType, Campaign, CampaignStatus
    from whistle_web.errors import Actor
    from whistle_web.extensions import db
    from whistle_web.models import (
        SendRequest,
        SendRequestKind,
        Template,
        TemplateVersion,
        VersionState,
    )
    from whistle_web.organizations.services import create_organization
    from whistle_web.tenancy import organization_scope

    org = create_organization("Funnel bench")
    with organization_scope(org.id):
        add_member(
            create_user("viewer@example.com", PASSWORD), Role.VIEWER, actor=Actor.system("bench")
        )
        template = Template(key="digest", name="Digest")
        db.session.add(template)
        db.session.flush()
        version = TemplateVersion(
            template_id=template.id,
            version=1,
            state=VersionState.PUBLISHED,
            content={"email": {"subject": "Hi", "text": "x"}},
        )
        db.session.add(version)
        db.session.flush()
        template.published_version_id = version.id
        campaigns = []
        for index in range(args.noise_campaigns + 2):
            campaign = Campaign(
                name="Big send" if index == 0 else f"Campaign {index}",
                status=CampaignStatus.COMPLETED,
                template_id=template.id,
                template_version_id=version.id,
                channels=list(CHANNELS),
                audience_type=AudienceType.ALL,
                launched_at=now - timedelta(days=args.days + 1),
            )
            db.session.add(campaign)
            campaigns.append(campaign)
        db.session.flush()
        request = SendRequest(
            kind=SendRequestKind.CAMPAIGN,
            campaign_id=campaigns[0].id,
            template_id=template.id,
            template_version_id=version.id,
            audience={"type": "all"},
        )
        db.session.add(request)
        db.session.commit()
        ids = {
            "org": org.id,
            "template": template.id,
            "campaign": campaigns[0].id,
            "other": campaigns[1].id,
            "request": request.id,
        }
        noise = [c.id for c in campaigns[1:]]
    start = (now - timedelta(days=args.days)).replace(minute=0, second=0, microsecond=0)
    hours = args.days * 24
    began = time.perf_counter()
    rows = copy_counters(
        org.id,
        [("campaign", ids["campaign"]), ("template", ids["template"]), ("organization", org.id)],
        args.deliveries,
        start,
        hours,
    )
    for campaign_id in noise:  # 2-day campaigns of 50,000 deliveries each
        rows += copy_counters(org.id, [("campaign", campaign_id)], 50_000, start, 48)
    print(f"seeded {rows:,} counter rows in {time.perf_counter() - began:.1f} s")
    if args.clicks:
        began = time.perf_counter()
        seed_clicks(
            org.id,
            ids["request"],
            ids["campaign"],
            ids["template"],
            args.clicks,
            start,
            args.days,
            args.links,
        )
        print(
            f"seeded {args.clicks:,} clicked deliveries and events of the campaign (and as many"
            f" of another) in {time.perf_counter() - began:.1f} s"
        )
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in (
            "delivery_stats",
            "delivery_link_stats",
            "deliveries",
            "delivery_events",
            "notifications",
        ):
            conn.execute(text(f"VACUUM ANALYZE {table}"))
    with organization_scope(org.id):
        targeted = db.session.scalar(
            text(
                "SELECT sum(value) FROM delivery_stats WHERE scope = 'campaign'"
                " AND scope_id = :id AND metric = 'targeted'"
            ),
            {"id": ids["campaign"]},
        )
    assert targeted == args.deliveries, targeted
    return ids


def sign_in(app: Any) -> Any:
    client = app.test_client()
    page = client.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
    assert token
    response = client.post(
        "/login",
        data={"email": "viewer@example.com", "password": PASSWORD, "csrf_token": token.group(1)},
    )
    assert response.status_code == 302, response.status_code
    return client


def timed(client: Any, url: str, runs: int) -> dict[str, Any]:
    times = []
    for run in range(runs + 1):
        started = time.perf_counter()
        response = client.get(url)
        elapsed = (time.perf_counter() - started) * 1000
        assert response.status_code == 200, (url, response.status_code)
        if run:
            times.append(elapsed)
    return {"median_ms": statistics.median(times), "runs_ms": times, "bytes": len(response.data)}


def explain_links(ids: dict[str, int]) -> list[str]:
    """EXPLAIN ANALYZE of the top-links query as the console runs it."""
    from sqlalchemy import event

    from whistle_web.deliveries.services import top_clicked_links
    from whistle_web.extensions import db
    from whistle_web.models import StatScope
    from whistle_web.tenancy import organization_scope

    captured: list[Any] = []

    def grab(conn: Any, cursor: Any, statement: str, params: Any, *rest: Any) -> None:
        if "delivery_link_stats" in statement:
            captured.append((statement, params))

    event.listen(db.engine, "before_cursor_execute", grab)
    try:
        with organization_scope(ids["org"]):
            top_clicked_links(StatScope.CAMPAIGN, ids["campaign"])
            statement, params = captured[-1]
            raw = db.session.connection().connection.driver_connection
            with raw.cursor() as cursor:
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
                lines = [row[0] for row in cursor.fetchall()]
    finally:
        event.remove(db.engine, "before_cursor_execute", grab)
        db.session.rollback()
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--noise-campaigns", type=int, default=200)
    parser.add_argument("--clicks", type=int, default=200_000)
    parser.add_argument("--links", type=int, default=20, help="distinct links clicked")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_services(args)
    recreate_database(args.database_url)
    if not args.keep:
        atexit.register(drop_database, args.database_url)
    from whistle_web import create_app

    now = datetime.now(UTC)
    app = create_app()
    with app.app_context():
        ids = setup(args, now)
    client = sign_in(app)
    campaign, other, template = ids["campaign"], ids["other"], ids["template"]
    pages = {
        "campaign funnel (all channels)": f"/campaigns/{campaign}/funnel",
        "campaign funnel, one channel": f"/campaigns/{campaign}/funnel?channel=email",
        "campaign funnel ?compare=": f"/campaigns/{campaign}/funnel?compare={other}",
        "campaign funnel CSV": f"/campaigns/{campaign}/funnel.csv",
        "template funnel": f"/templates/{template}/funnel",
        "top clicked links fragment": f"/campaigns/{campaign}/funnel/links",
    }
    wait_until_quiet(args.quiet_wait)
    print(
        f"\n{args.deliveries:,} deliveries over {args.days} days on {len(CHANNELS)} channels;"
        f" {args.clicks:,} clicks on {args.links:,} links; median of {args.runs} renders after"
        " a warm-up\n"
    )
    for label, url in pages.items():
        result = timed(client, url, args.runs)
        runs = ", ".join(f"{t:.0f}" for t in result["runs_ms"])
        verdict = "meets" if result["median_ms"] < GOAL_MS else "misses"
        print(
            f"{label:<32} median {result['median_ms']:7.1f} ms ({verdict} the {GOAL_MS:.0f} ms"
            f" goal) runs: {runs}  [{result['bytes']:,} bytes]"
        )
    if args.clicks:
        with app.app_context():
            lines = explain_links(ids)
        print("\ntop clicked links query plan:")
        for line in lines:
            print(f"    {line}")


if __name__ == "__main__":
    main()
