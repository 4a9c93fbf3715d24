"""Console delivery funnels: numbers equal to the ledger, no query on deliveries, chart,
comparison, CSV, top links, channels, empty states, roles, tenancy, htmx."""

from __future__ import annotations

import csv
import io
import itertools
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, func, select, text

from tests.factories import SYSTEM
from whistle_web.accounts.models import Role
from whistle_web.campaigns.models import AudienceType
from whistle_web.campaigns.services import create_campaign
from whistle_web.channels.kinds import Channel
from whistle_web.deliveries.failures import BOUNCED_REASONS, FAILED_REASONS, FailureReason
from whistle_web.deliveries.models import Delivery, DeliveryEvent
from whistle_web.deliveries.services import FUNNEL_STEPS, rebuild_stats
from whistle_web.deliveries.status import DeliveryStatus, SuppressionCause
from whistle_web.extensions import db
from whistle_web.models import Notification, StatScope
from whistle_web.tenancy import organization_scope

HX = {"HX-Request": "true"}
CONTENT = {
    "email": {"subject": "Hi", "text": "Hello", "html": "<p>Hello</p>"},
    "in_app": {"title": "Hi", "body": "Hello"},
}
STAMPS = ("sent_at", "delivered_at", "seen_at", "read_at", "clicked_at")
# (status, how far along the stamps it got, suppression or failure reason), each several times.
PLAN = [
    (DeliveryStatus.QUEUED, 0, None),
    (DeliveryStatus.SENDING, 0, None),
    (DeliveryStatus.SENT, 1, None),
    (DeliveryStatus.DELIVERED, 2, None),
    (DeliveryStatus.SEEN, 3, None),
    (DeliveryStatus.READ, 4, None),
    (DeliveryStatus.CLICKED, 5, None),
    *((DeliveryStatus.FAILED, 0, reason) for reason in sorted(FAILED_REASONS)),
    *((DeliveryStatus.BOUNCED, 1, reason) for reason in sorted(BOUNCED_REASONS)),
    (DeliveryStatus.CANCELLED, 0, None),
    *((DeliveryStatus.SUPPRESSED, 0, cause) for cause in SuppressionCause),
]
_n = itertools.count(1)


@pytest.fixture
def template(org, make_template):  # type: ignore[no-untyped-def]
    return make_template(org, "digest", CONTENT)


def make_campaign(org, name="Spring sale", channels=("email", "in_app")):  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        return create_campaign(
            name,
            actor=SYSTEM,
            template_key="digest",
            channels=list(channels),
            audience_type=AudienceType.ALL,
        )


def seed(org, campaign, make_recipient, make_send_request, template, *, at=None, copies=3):  # type: ignore[no-untyped-def]
    """Deliveries of ``campaign`` in every ledger state and suppression reason, on two
    channels, then the counters rebuilt from them."""
    at = at or datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    request = make_send_request(org, template=template, campaign=campaign)
    with organization_scope(org.id):
        for i, (status, reached, reason) in enumerate(PLAN * copies):
            recipient = make_recipient(org, f"f{next(_n)}", email=f"f{next(_n)}@example.com")
            notification = Notification(
                send_request_id=request.id,
                campaign_id=campaign.id,
                template_id=template.id,
                recipient_id=recipient.id,
            )
            db.session.add(notification)
            db.session.flush()
            for channel in (Channel.EMAIL, Channel.IN_APP)[: 1 + (i // len(PLAN)) % 2]:
                delivery = Delivery(
                    notification_id=notification.id,
                    recipient_id=recipient.id,
                    campaign_id=campaign.id,
                    template_id=template.id,
                    channel=channel,
                    status=status,
                    suppression_reason=reason if isinstance(reason, SuppressionCause) else None,
                    failure_reason=reason if isinstance(reason, FailureReason) else None,
                    created_at=at + timedelta(hours=i % 3),
                )
                for stamp in STAMPS[:reached]:
                    setattr(delivery, stamp, at + timedelta(hours=i % 3, minutes=5))
                if status == DeliveryStatus.FAILED:
                    delivery.failed_at = at
                if status == DeliveryStatus.BOUNCED:
                    delivery.bounced_at = at
                db.session.add(delivery)
                db.session.flush()
                if status == DeliveryStatus.CLICKED:
                    url = "https://acme.test/b" if i // len(PLAN) == 2 else "https://acme.test/a"
                    db.session.add(
                        DeliveryEvent(
                            delivery_id=delivery.id,
                            type="clicked",
                            occurred_at=at + timedelta(hours=1),
                            data={"url": url},
                        )
                    )
        db.session.flush()
        rebuild_stats(StatScope.CAMPAIGN, campaign.id)
        rebuild_stats(StatScope.TEMPLATE, template.id)
        db.session.flush()
    return request


@pytest.fixture
def seeded(org, template, make_recipient, make_send_request):  # type: ignore[no-untyped-def]
    campaign = make_campaign(org)
    seed(org, campaign, make_recipient, make_send_request, template)
    return campaign


def ledger(org, campaign_id, channel=None):  # type: ignore[no-untyped-def]
    """COUNT over the deliveries, per funnel step: what the counters must equal."""
    with organization_scope(org.id):
        counts = {}
        for metric, condition in FUNNEL_STEPS.items():
            query = (
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.campaign_id == campaign_id, condition)
            )
            if channel:
                query = query.where(Delivery.channel == channel)
            counts[metric] = db.session.scalar(query)
        return counts


def csv_rows(response):  # type: ignore[no-untyped-def]
    return list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))


# --- numbers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("channel", [None, "email", "in_app"])
def test_funnel_numbers_equal_the_ledger(login_as, org, seeded, channel):  # type: ignore[no-untyped-def]
    client = login_as(Role.VIEWER)
    response = client.get(f"/campaigns/{seeded.id}/funnel.csv", query_string={"channel": channel})
    assert response.status_code == 200
    scope = channel or "all"
    got = {
        r["metric"]: int(r["value"])
        for r in csv_rows(response)
        if r["section"] == "funnel" and r["channel"] == scope
    }
    expected = ledger(org, seeded.id, channel)
    for metric in ("targeted", "suppressed", "queued", "sent", "delivered", "seen", "read"):
        assert got[metric] == expected[metric], metric
    assert got["clicked"] == expected["clicked"]
    assert expected["targeted"] > expected["queued"] > expected["sent"] > expected["clicked"] > 0
    # Failures and every suppression reason appear, equal to the ledger.
    rows = csv_rows(response)
    with organization_scope(org.id):
        for cause in SuppressionCause:
            query = select(func.count()).where(
                Delivery.campaign_id == seeded.id, Delivery.suppression_reason == cause
            )
            if channel:
                query = query.where(Delivery.channel == channel)
            want = db.session.scalar(query)
            have = [
                int(r["value"])
                for r in rows
                if r["section"] == "suppressed" and r["metric"] == cause.value
            ]
            assert (have or [0]) == [want]
        # Failures and bounces by reason, equal to the ledger.
        for status, reasons in (("failed", FAILED_REASONS), ("bounced", BOUNCED_REASONS)):
            query = (
                select(Delivery.failure_reason, func.count())
                .where(Delivery.campaign_id == seeded.id, Delivery.status == status)
                .group_by(Delivery.failure_reason)
            )
            if channel:
                query = query.where(Delivery.channel == channel)
            want = {str(reason): n for reason, n in db.session.execute(query).all()}
            have = {r["metric"]: int(r["value"]) for r in rows if r["section"] == status}
            assert have == want and set(want) == {r.value for r in reasons}
            assert sum(have.values()) == expected[status]


def test_the_page_shows_the_steps_rates_chart_and_numbers(login_as, org, seeded):  # type: ignore[no-untyped-def]
    client = login_as(Role.VIEWER)
    page = client.get(f"/campaigns/{seeded.id}/funnel")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    expected = ledger(org, seeded.id)
    assert "<svg" in html and '<title id="main-bars-title">' in html and "<desc" in html
    assert 'class="funnel-series"' in html and "polyline" in html
    assert f'<td class="num">{expected["targeted"]:,}</td>' in html
    rate = expected["sent"] / expected["queued"]
    assert f"{rate:.1%}" in html
    assert "unsubscribed" in html and "frequency cap" in html
    assert "Hourly sends and engagement" in html  # a range under 3 days
    # the nav highlights Campaigns
    assert 'href="/campaigns" aria-current="page"' in html


def test_failures_and_bounces_by_reason_beside_the_suppressed(login_as, org, seeded):  # type: ignore[no-untyped-def]
    client = login_as(Role.VIEWER)
    html = client.get(f"/campaigns/{seeded.id}/funnel").get_data(as_text=True)
    reasons = html[html.index('<div class="reasons">') :]
    for caption in ("Suppressed by reason", "Failed by reason", "Bounced by reason"):
        assert f"<caption>{caption}</caption>" in reasons
    failed = reasons[reasons.index("Failed by reason") : reasons.index("Bounced by reason")]
    for reason in FAILED_REASONS:
        # three copies on email, the second on in-app as well
        want = '<td class="num">4</td>'
        assert f'<th scope="row">{reason.replace("_", " ")}</th>{want}' in failed, reason
    bounced = reasons[reasons.index("Bounced by reason") :]
    assert '<th scope="row">hard bounce</th><td class="num">4</td>' in bounced
    assert '<th scope="row">provider suppressed</th>' in bounced
    # narrowed to a channel: that channel's reasons
    in_app = client.get(f"/campaigns/{seeded.id}/funnel?channel=in_app").get_data(as_text=True)
    assert '<th scope="row">gave up</th><td class="num">1</td>' in in_app


def test_a_funnel_without_failures_says_so(  # type: ignore[no-untyped-def]
    login_as, org, template, make_recipient, make_send_request
):
    campaign = make_campaign(org, "Clean")
    request = make_send_request(org, template=template, campaign=campaign)
    with organization_scope(org.id):
        recipient = make_recipient(org, "clean", email="clean@example.com")
        notification = Notification(
            send_request_id=request.id,
            campaign_id=campaign.id,
            template_id=template.id,
            recipient_id=recipient.id,
        )
        db.session.add(notification)
        db.session.flush()
        db.session.add(
            Delivery(
                notification_id=notification.id,
                recipient_id=recipient.id,
                campaign_id=campaign.id,
                template_id=template.id,
                channel=Channel.EMAIL,
                status=DeliveryStatus.SENT,
                sent_at=datetime.now(UTC),
            )
        )
        db.session.flush()
        rebuild_stats(StatScope.CAMPAIGN, campaign.id)
    html = login_as(Role.VIEWER).get(f"/campaigns/{campaign.id}/funnel").get_data(as_text=True)
    assert "None failed." in html and "None bounced." in html and "None suppressed." in html


def test_failures_counted_before_reasons_were_show_as_other(login_as, org, seeded):  # type: ignore[no-untyped-def]
    # Counters written before migration 0008: the totals without a per-reason split.
    with organization_scope(org.id):
        db.session.execute(
            text(
                "INSERT INTO delivery_stats"
                " (organization_id, scope, scope_id, channel, metric, bucket, value)"
                " VALUES (:org, 'campaign', :id, 'email', 'failed', now(), 4)"
            ),
            {"org": org.id, "id": seeded.id},
        )
    client = login_as(Role.VIEWER)
    rows = csv_rows(client.get(f"/campaigns/{seeded.id}/funnel.csv"))
    failed = {r["metric"]: int(r["value"]) for r in rows if r["section"] == "failed"}
    total = next(
        int(r["value"]) for r in rows if r["section"] == "funnel" and r["metric"] == "targeted"
    )
    assert total and failed["other"] == 4 + 4  # the seeded "other" failures, and the rest
    html = client.get(f"/campaigns/{seeded.id}/funnel").get_data(as_text=True)
    assert '<th scope="row">other</th><td class="num">8</td>' in html


def test_the_funnel_never_queries_deliveries(app, login_as, seeded):  # type: ignore[no-untyped-def]
    client = login_as(Role.VIEWER)
    statements: list[str] = []

    def listen(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        statements.append(statement)

    engine = db.engine
    event.listen(engine, "before_cursor_execute", listen)
    try:
        for url in (
            f"/campaigns/{seeded.id}/funnel",
            f"/campaigns/{seeded.id}/funnel?channel=email",
            f"/campaigns/{seeded.id}/funnel.csv",
            f"/templates/{seeded.template_id}/funnel",
        ):
            assert client.get(url).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    assert any("delivery_stats" in s for s in statements)
    assert not [s for s in statements if "deliveries" in s], "a funnel query read the ledger"


def test_daily_series_for_a_long_campaign(
    login_as, org, template, make_recipient, make_send_request
):  # type: ignore[no-untyped-def]
    campaign = make_campaign(org)
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=10)
    seed(org, campaign, make_recipient, make_send_request, template, at=start, copies=1)
    seed(org, campaign, make_recipient, make_send_request, template, copies=1)
    html = login_as(Role.VIEWER).get(f"/campaigns/{campaign.id}/funnel").get_data(as_text=True)
    assert "Daily sends and engagement" in html
    assert start.strftime("%Y-%m-%d") in html


def test_per_channel_narrowing_and_htmx_fragment(login_as, org, seeded):  # type: ignore[no-untyped-def]
    client = login_as(Role.VIEWER)
    full = client.get(f"/campaigns/{seeded.id}/funnel?channel=in_app").get_data(as_text=True)
    assert "<html" in full and "Funnel (in-app)" in full
    fragment = client.get(f"/campaigns/{seeded.id}/funnel?channel=in_app", headers=HX)
    text = fragment.get_data(as_text=True)
    assert fragment.status_code == 200 and "<html" not in text and "Funnel (in-app)" in text
    # an unknown channel falls back to all channels
    assert client.get(f"/campaigns/{seeded.id}/funnel?channel=nope").status_code == 200


def test_top_clicked_links(login_as, org, seeded):  # type: ignore[no-untyped-def]
    client = login_as(Role.VIEWER)
    fragment = client.get(f"/campaigns/{seeded.id}/funnel/links", headers=HX)
    text = fragment.get_data(as_text=True)
    assert "<html" not in text
    assert text.index("https://acme.test/a") < text.index("https://acme.test/b")
    with organization_scope(org.id):
        clicks = db.session.scalar(select(func.count()).select_from(DeliveryEvent))
    assert clicks == 4  # email in 3 copies, in-app in the second
    assert '<td class="num">3</td>' in text and '<td class="num">1</td>' in text
    full = client.get(f"/campaigns/{seeded.id}/funnel/links").get_data(as_text=True)
    assert "<html" in full and "https://acme.test/a" in full


def test_template_funnel(login_as, org, seeded, template):  # type: ignore[no-untyped-def]
    client = login_as(Role.VIEWER)
    page = client.get(f"/templates/{template.id}/funnel")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and "Funnel: Template" in html
    assert 'href="/templates" aria-current="page"' in html
    expected = ledger(org, seeded.id)
    rows = csv_rows(client.get(f"/templates/{template.id}/funnel.csv"))
    got = {r["metric"]: int(r["value"]) for r in rows if r["section"] == "funnel"}
    assert got["targeted"] == expected["targeted"] and got["clicked"] == expected["clicked"]
    links = client.get(f"/templates/{template.id}/funnel/links").get_data(as_text=True)
    assert "https://acme.test/a" in links


# --- comparison and CSV ----------------------------------------------------------------------
def test_compare_two_campaigns(login_as, org, seeded, template, make_recipient, make_send_request):  # type: ignore[no-untyped-def]
    other = make_campaign(org, "Autumn sale", channels=("email",))
    seed(org, other, make_recipient, make_send_request, template, copies=1)
    client = login_as(Role.VIEWER)
    page = client.get(f"/campaigns/{seeded.id}/funnel?compare={other.id}")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "Spring sale compared with Autumn sale" in html
    mine, theirs = ledger(org, seeded.id), ledger(org, other.id)
    assert f'<td class="num">{mine["targeted"]:,}</td>' in html
    assert f'<td class="num">{theirs["targeted"]:,}</td>' in html
    assert f'<option value="{other.id}" selected>' in html
    # each side shows its failures and bounces by reason
    sides = html[html.index('<div class="side-by-side">') :]
    assert sides.count("<caption>Failed by reason</caption>") == 2
    assert sides.count("<caption>Bounced by reason</caption>") == 2
    assert '<th scope="row">template error</th><td class="num">1</td>' in sides  # Autumn
    rows = csv_rows(client.get(f"/campaigns/{seeded.id}/funnel.csv?compare={other.id}"))
    targeted = {
        int(r["campaign_id"]): int(r["value"])
        for r in rows
        if r["section"] == "funnel" and r["metric"] == "targeted"
    }
    assert targeted == {seeded.id: mine["targeted"], other.id: theirs["targeted"]}
    # comparing with itself or nonsense is a form error, not a 500
    assert client.get(f"/campaigns/{seeded.id}/funnel?compare={seeded.id}").status_code == 422
    assert client.get(f"/campaigns/{seeded.id}/funnel?compare=abc").status_code == 422
    assert client.get(f"/campaigns/{seeded.id}/funnel?compare={2**70}").status_code == 404


def test_a_comparison_stays_on_the_chosen_channel(  # type: ignore[no-untyped-def]
    login_as, org, seeded, template, make_recipient, make_send_request
):
    other = make_campaign(org, "Autumn sale", channels=("email",))
    seed(org, other, make_recipient, make_send_request, template, copies=1)  # email only
    client = login_as(Role.VIEWER)
    query = f"channel=in_app&compare={other.id}"
    rows = csv_rows(client.get(f"/campaigns/{seeded.id}/funnel.csv?{query}"))
    targeted = {
        (int(r["campaign_id"]), r["channel"]): int(r["value"])
        for r in rows
        if r["section"] == "funnel" and r["metric"] == "targeted"
    }
    # Autumn's in-app funnel is empty, not its funnel over every channel
    assert targeted == {
        (seeded.id, "in_app"): ledger(org, seeded.id, "in_app")["targeted"],
        (other.id, "in_app"): 0,
    }
    html = client.get(f"/campaigns/{seeded.id}/funnel?{query}").get_data(as_text=True)
    autumn = html[html.index("<h2>Autumn sale</h2>") :]
    assert "Nothing sent yet." in autumn[: autumn.index("</div>")]


@pytest.mark.parametrize("value", ["²", "١٢", " ", "-1", "1e3"])
def test_a_compare_value_that_is_no_id_is_a_form_error(login_as, seeded, value):  # type: ignore[no-untyped-def]
    client = login_as(Role.VIEWER)
    page = client.get(f"/campaigns/{seeded.id}/funnel", query_string={"compare": value})
    assert page.status_code == (200 if value == " " else 422)
    rows = csv_rows(
        client.get(f"/campaigns/{seeded.id}/funnel.csv", query_string={"compare": value})
    )
    assert {r["campaign_id"] for r in rows} == {str(seeded.id)}


def test_csv_content(login_as, org, seeded):  # type: ignore[no-untyped-def]
    response = login_as(Role.VIEWER).get(f"/campaigns/{seeded.id}/funnel.csv")
    assert response.mimetype == "text/csv"
    assert f'filename="campaign-{seeded.id}-funnel.csv"' in response.headers["Content-Disposition"]
    rows = csv_rows(response)
    assert list(rows[0]) == [
        "campaign", "campaign_id", "section", "channel", "metric", "period", "value", "rate",
    ]  # fmt: skip
    sections = {r["section"] for r in rows}
    assert {"funnel", "channel", "suppressed", "failed", "bounced", "series_hour"} <= sections
    failed = [r for r in rows if r["section"] == "failed"]
    assert {r["metric"] for r in failed} == {r.value for r in FAILED_REASONS}
    assert all(r["channel"] == "all" and r["rate"] == "" for r in failed)
    sent = next(r for r in rows if r["section"] == "funnel" and r["metric"] == "sent")
    expected = ledger(org, seeded.id)
    assert sent["rate"] == f"{expected['sent'] / expected['queued']:.4f}"
    series_sent = sum(
        int(r["value"]) for r in rows if r["section"] == "series_hour" and r["metric"] == "sent"
    )
    assert series_sent == expected["sent"]


def test_csv_neutralises_formulas(login_as, org, template):  # type: ignore[no-untyped-def]
    campaign = make_campaign(org, "=HYPERLINK(1)")
    rows = csv_rows(login_as(Role.VIEWER).get(f"/campaigns/{campaign.id}/funnel.csv"))
    assert rows and all(r["campaign"] == "'=HYPERLINK(1)" for r in rows)


# --- empty states, access, tenancy -----------------------------------------------------------
def test_a_campaign_never_launched(login_as, org, template):  # type: ignore[no-untyped-def]
    campaign = make_campaign(org, "Draft only")
    client = login_as(Role.VIEWER)
    html = client.get(f"/campaigns/{campaign.id}/funnel").get_data(as_text=True)
    assert "Nothing sent yet" in html and "funnel-series" not in html
    links = client.get(f"/campaigns/{campaign.id}/funnel/links").get_data(as_text=True)
    assert "No clicked links yet" in links
    rows = csv_rows(client.get(f"/campaigns/{campaign.id}/funnel.csv"))
    assert {r["metric"]: r["value"] for r in rows if r["section"] == "funnel"}["targeted"] == "0"
    assert client.get(f"/templates/{template.id}/funnel").status_code == 200


@pytest.mark.parametrize("role", list(Role))
def test_every_role_may_view(login_as, seeded, role):  # type: ignore[no-untyped-def]
    client = login_as(role)
    for url in (
        f"/campaigns/{seeded.id}/funnel",
        f"/campaigns/{seeded.id}/funnel.csv",
        f"/campaigns/{seeded.id}/funnel/links",
        f"/templates/{seeded.template_id}/funnel",
        f"/templates/{seeded.template_id}/funnel.csv",
        f"/templates/{seeded.template_id}/funnel/links",
    ):
        assert client.get(url).status_code == 200, url


def test_anonymous_users_sign_in_first(client, seeded):  # type: ignore[no-untyped-def]
    response = client.get(f"/campaigns/{seeded.id}/funnel")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_foreign_and_unknown_ids_are_not_found(login_as, other_org, seeded):  # type: ignore[no-untyped-def]
    stranger = login_as(Role.OWNER, organization=other_org)
    for url in (
        f"/campaigns/{seeded.id}/funnel",
        f"/campaigns/{seeded.id}/funnel.csv",
        f"/campaigns/{seeded.id}/funnel/links",
        f"/templates/{seeded.template_id}/funnel",
        f"/templates/{seeded.template_id}/funnel.csv",
        f"/templates/{seeded.template_id}/funnel/links",
        f"/campaigns/{2**70}/funnel",
    ):
        assert stranger.get(url).status_code == 404, url


def test_comparing_with_a_foreign_campaign_is_not_found(
    login_as, org, other_org, template, make_template
):  # type: ignore[no-untyped-def]
    mine = make_campaign(org)
    make_template(other_org, "digest", CONTENT)
    theirs = make_campaign(other_org, "Theirs")
    client = login_as(Role.VIEWER)
    assert client.get(f"/campaigns/{mine.id}/funnel?compare={theirs.id}").status_code == 404


def test_periods_are_utc_whatever_the_sessions_time_zone(  # type: ignore[no-untyped-def]
    login_as, org, template, make_recipient, make_send_request
):
    campaign = make_campaign(org)
    start = datetime.now(UTC).replace(hour=20, minute=0, second=0, microsecond=0)
    seed(org, campaign, make_recipient, make_send_request, template, at=start - timedelta(days=5))
    seed(org, campaign, make_recipient, make_send_request, template, at=start - timedelta(days=1))
    client = login_as(Role.VIEWER)

    def series():  # type: ignore[no-untyped-def]
        rows = csv_rows(client.get(f"/campaigns/{campaign.id}/funnel.csv"))
        return [
            (r["period"], r["metric"], r["value"]) for r in rows if r["section"] == "series_day"
        ]

    in_utc = series()
    assert in_utc and all(period.endswith("T00:00:00Z") for period, _m, _v in in_utc)
    db.session.execute(text("SET timezone = 'Pacific/Kiritimati'"))
    try:
        assert series() == in_utc
    finally:
        db.session.execute(text("SET timezone = 'UTC'"))
