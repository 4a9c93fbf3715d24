"""The dashboard: sends today by channel, 7-day rates with sparklines, running and scheduled
campaigns, failures needing attention, queue health, roles and tenancy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.factories import SYSTEM
from whistle_web.accounts.models import Role
from whistle_web.campaigns.models import AudienceType, CampaignStatus
from whistle_web.campaigns.services import create_campaign
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.extensions import db
from whistle_web.models import DeliveryStat, Provider, StatScope
from whistle_web.tenancy import organization_scope
from workers import monitoring

CONTENT = {"in_app": {"title": "Hi", "body": "Hello"}}


@pytest.fixture
def template(org, make_template):  # type: ignore[no-untyped-def]
    return make_template(org, "digest", CONTENT)


def campaign(org, name, status=None, **fields):  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        made = create_campaign(
            name,
            actor=SYSTEM,
            template_key="digest",
            channels=["in_app"],
            audience_type=AudienceType.ALL,
        )
        if status is not None:
            made.status = status
        for key, value in fields.items():
            setattr(made, key, value)
        db.session.flush()
        return made


def counters(org, values, *, scope=StatScope.ORGANIZATION, scope_id=None):  # type: ignore[no-untyped-def]
    """values: [(channel, metric, bucket, value)]"""
    with organization_scope(org.id):
        for channel, metric, bucket, value in values:
            db.session.add(
                DeliveryStat(
                    scope=scope,
                    scope_id=scope_id or org.id,
                    channel=Channel(channel),
                    metric=metric,
                    bucket=bucket.replace(minute=0, second=0, microsecond=0),
                    value=value,
                )
            )
        db.session.flush()


def now():  # type: ignore[no-untyped-def]
    return datetime.now(UTC)


@pytest.mark.parametrize("role", list(Role))
def test_every_role_sees_the_dashboard(login_as, role):  # type: ignore[no-untyped-def]
    page = login_as(role).get("/")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "Nothing was sent in the last 7 days" in html
    assert "No campaign is sending." in html and "Nothing scheduled." in html
    assert 'href="/" aria-current="page"' in html
    # queue health for everyone; the way to Operations for admins and owners only
    assert "<h2>Queues</h2>" in html
    link = "Workers, failed jobs and scheduled items in Operations"
    assert (link in html) == (role in (Role.ADMIN, Role.OWNER))


def test_anonymous_users_sign_in_first(client):  # type: ignore[no-untyped-def]
    response = client.get("/")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_sends_today_by_channel(login_as, org):  # type: ignore[no-untyped-def]
    today = now().replace(hour=0)
    counters(
        org,
        [
            ("email", "sent", today, 7),
            ("email", "sent", now(), 1234),
            ("sms", "sent", today, 3),
            ("email", "sent", today - timedelta(days=1), 100),  # yesterday
            ("email", "queued", today, 999),
        ],
    )
    html = login_as(Role.VIEWER).get("/").get_data(as_text=True)
    assert 'Sent today</span><span class="value">1,244</span>' in html
    assert 'email today</span><span class="value">1,241</span>' in html
    assert 'sms today</span><span class="value">3</span>' in html


def test_seven_day_rates_and_sparklines(login_as, org):  # type: ignore[no-untyped-def]
    day = now().replace(hour=12)
    values = []
    for back in range(7):
        values += [
            ("email", "sent", day - timedelta(days=back), 100),
            ("email", "delivered", day - timedelta(days=back), 90),
            ("email", "seen", day - timedelta(days=back), 40),
            ("email", "clicked", day - timedelta(days=back), 10),
        ]
    values += [
        ("email", "sent", day - timedelta(days=9), 10_000),  # outside the window
        ("in_app", "sent", day, 50),
        ("in_app", "seen", day, 25),
        ("in_app", "failed", day, 2),
    ]
    counters(org, values)
    html = login_as(Role.VIEWER).get("/").get_data(as_text=True)
    assert '<td class="num">700</td>' in html  # 7 x 100, not the older 10,000
    assert "90.0%" in html and "40.0%" in html and "10.0%" in html  # email rates
    assert "50.0%" in html  # in-app seen
    assert html.count('<svg class="sparkline"') == 2
    assert '<title id="spark-email-t">email: delivery and engagement rate per day' in html
    assert "100 sent, delivered 90.0%, seen 40.0%" in html  # the numbers behind the line


def test_running_scheduled_and_recent_campaigns_link_to_their_pages(login_as, org, template):  # type: ignore[no-untyped-def]
    sending = campaign(org, "Now sending", CampaignStatus.SENDING, launched_at=now())
    paused = campaign(org, "On hold", CampaignStatus.PAUSED, launched_at=now())
    later = campaign(org, "Next week", CampaignStatus.SCHEDULED, send_at=now() + timedelta(days=7))
    done = campaign(org, "Finished", CampaignStatus.COMPLETED, completed_at=now())
    draft = campaign(org, "Just a draft")
    html = login_as(Role.VIEWER).get("/").get_data(as_text=True)
    for shown in (sending, paused, later, done):
        assert f'href="/campaigns/{shown.id}">{shown.name}</a>' in html
    assert f'href="/campaigns/{done.id}/funnel"' in html
    assert draft.name not in html
    assert later.send_at.strftime("%Y-%m-%d %H:%M UTC") in html


def test_failures_needing_attention(login_as, org, template, monkeypatch):  # type: ignore[no-untyped-def]
    bad = campaign(org, "Bouncy", CampaignStatus.COMPLETED)
    fine = campaign(org, "Healthy", CampaignStatus.COMPLETED)
    old = campaign(org, "Long ago", CampaignStatus.COMPLETED)
    at = now() - timedelta(hours=3)
    for c, failed in ((bad, 9), (fine, 1)):
        counters(
            org,
            [
                ("email", "queued", at, 100),
                ("email", "failed", at, failed),
                ("email", "bounced", at, 3),
            ],
            scope=StatScope.CAMPAIGN,
            scope_id=c.id,
        )
    counters(
        org,
        [
            ("email", "queued", at - timedelta(days=30), 100),
            ("email", "failed", at - timedelta(days=30), 90),
        ],
        scope=StatScope.CAMPAIGN,
        scope_id=old.id,
    )
    with organization_scope(org.id):
        db.session.add(
            Provider(
                channel=Channel.SMS,
                kind=ProviderKind.TWILIO,
                name="Backup SMS",
                credentials_encrypted=b"x",
                enabled=False,
            )
        )
        db.session.flush()
    monkeypatch.setattr(monitoring, "failed_jobs", lambda connection, org_id, limit=100: ["a", "b"])
    viewer = login_as(Role.VIEWER).get("/").get_data(as_text=True)
    attention = viewer[viewer.index("Needs attention") : viewer.index("Running campaigns")]
    assert "Bouncy" in attention and "12.0% failed or bounced" in attention
    assert "Healthy" not in attention and "Long ago" not in attention
    assert "2 failed jobs" in attention and "/operations" not in attention
    assert "Provider Backup SMS (sms) is disabled" in attention
    admin = login_as(Role.ADMIN).get("/").get_data(as_text=True)
    assert "retry them in Operations" in admin


def test_nothing_needs_attention(login_as, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(monitoring, "failed_jobs", lambda connection, org_id, limit=100: [])
    html = login_as(Role.VIEWER).get("/").get_data(as_text=True)
    assert "no campaign above 5% failures, no failed jobs, every provider enabled" in html


def test_failed_jobs_are_counted_for_this_organization(login_as, org, monkeypatch):  # type: ignore[no-untyped-def]
    asked = []

    def failed_jobs(connection, org_id, limit=100):  # type: ignore[no-untyped-def]
        asked.append(org_id)
        return []

    monkeypatch.setattr(monitoring, "failed_jobs", failed_jobs)
    login_as(Role.VIEWER).get("/")
    assert asked and set(asked) == {org.id}


def test_queue_health(login_as, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(
        monitoring,
        "queue_health",
        lambda connection: [monitoring.QueueHealth("high", 1234, 2, 5, 7)],
    )
    html = login_as(Role.OWNER).get("/").get_data(as_text=True)
    assert '<th scope="row">high</th><td class="num">1,234</td>' in html
    assert "Workers, failed jobs and scheduled items in Operations" in html


def test_redis_down_is_not_a_500(login_as, monkeypatch):  # type: ignore[no-untyped-def]
    def down(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RedisConnectionError("no redis")

    monkeypatch.setattr(monitoring, "queue_health", down)
    page = login_as(Role.VIEWER).get("/")
    assert page.status_code == 200
    assert "Queue health is unavailable" in page.get_data(as_text=True)


def test_only_this_organizations_numbers(login_as, org, other_org, make_template):  # type: ignore[no-untyped-def]
    make_template(other_org, "digest", CONTENT)
    theirs = campaign(other_org, "Their launch", CampaignStatus.SENDING)
    counters(other_org, [("email", "sent", now(), 555)])
    with organization_scope(other_org.id):
        db.session.add(
            Provider(
                channel=Channel.SMS,
                kind=ProviderKind.TWILIO,
                name="Their SMS",
                credentials_encrypted=b"x",
                enabled=False,
            )
        )
        db.session.flush()
    html = login_as(Role.OWNER, organization=org).get("/").get_data(as_text=True)
    assert theirs.name not in html and "555" not in html and "Their SMS" not in html
