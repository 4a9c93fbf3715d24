"""Console campaigns: list, composer, pre-launch check, live progress, actions, roles."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, run_jobs
from whistle_web.accounts.models import Role
from whistle_web.audiences.models import Segment, Subscription, Topic
from whistle_web.campaigns.models import AudienceType, Campaign, CampaignStatus
from whistle_web.campaigns.services import count_campaign_audience, create_campaign
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.deliveries.models import Delivery
from whistle_web.deliveries.planner import count_audience
from whistle_web.extensions import db
from whistle_web.models import Provider, SendRequest
from whistle_web.preferences.models import Preference, Suppression, SuppressionReason
from whistle_web.tenancy import organization_scope

HX = {"HX-Request": "true"}


@pytest.fixture
def jobs(redis):  # type: ignore[no-untyped-def]
    return lambda: run_jobs(redis)


@pytest.fixture
def template(org, make_template):  # type: ignore[no-untyped-def]
    return make_template(org, "digest", CONTENT)


@pytest.fixture
def recipients(org, make_recipient):  # type: ignore[no-untyped-def]
    return [
        make_recipient(org, f"r{i}", name=f"Person {i}", email=f"r{i}@example.com")
        for i in range(4)
    ]


def make_campaign(org, name="Weekly digest", **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("template_key", "digest")
    kwargs.setdefault("channels", ["in_app"])
    kwargs.setdefault("audience_type", AudienceType.ALL)
    with organization_scope(org.id):
        return create_campaign(name, actor=SYSTEM, **kwargs)


def form(client, **fields):  # type: ignore[no-untyped-def]
    data = {
        "csrf_token": client.csrf,
        "name": "Spring sale",
        "template": "digest",
        "channels": ["in_app"],
        "audience": "all",
        "when": "now",
        "timezone": "UTC",
        "payload": '{"reason": "spring"}',
    }
    data.update(fields)
    return data


def campaigns_of(org):  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        return db.session.scalars(select(Campaign).order_by(Campaign.id)).all()


# --- roles and access ------------------------------------------------------------------------
def test_anonymous_users_sign_in_first(client):
    response = client.get("/campaigns")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_a_viewer_reads_but_changes_nothing(login_as, org, template, recipients):
    campaign = make_campaign(org)
    viewer = login_as(Role.VIEWER)
    for path in ("/campaigns", f"/campaigns/{campaign.id}", f"/campaigns/{campaign.id}/check"):
        assert viewer.get(path).status_code == 200, path
    page = viewer.get(f"/campaigns/{campaign.id}").get_data(as_text=True)
    assert "Check and launch" not in page and "Duplicate" not in page and "Edit" not in page
    assert "New campaign" not in viewer.get("/campaigns").get_data(as_text=True)
    assert "Launch now" not in viewer.get(f"/campaigns/{campaign.id}/check").get_data(as_text=True)
    for path in ("/campaigns/new", f"/campaigns/{campaign.id}/edit", "/campaigns/channels"):
        assert viewer.get(path).status_code == 403, path
    assert viewer.get(f"/campaigns/{campaign.id}/cancel").status_code == 403
    for action in ("launch", "pause", "resume", "cancel", "duplicate", "delete", "edit"):
        response = viewer.post(f"/campaigns/{campaign.id}/{action}", data=form(viewer))
        assert response.status_code == 403, action
    assert viewer.post("/campaigns/new", data=form(viewer)).status_code == 403
    assert [c.status for c in campaigns_of(org)] == [CampaignStatus.DRAFT]


@pytest.mark.parametrize("role", [Role.EDITOR, Role.ADMIN, Role.OWNER])
def test_editors_and_up_compose_and_launch(login_as, org, template, recipients, role, redis):
    client = login_as(role)
    assert client.get("/campaigns/new").status_code == 200
    response = client.post("/campaigns/new", data=form(client))
    assert response.status_code == 303
    (campaign,) = campaigns_of(org)
    assert response.headers["Location"].endswith(f"/campaigns/{campaign.id}")
    launched = client.post(f"/campaigns/{campaign.id}/launch", data={"csrf_token": client.csrf})
    assert launched.status_code == 303
    db.session.refresh(campaign)
    assert campaign.status == CampaignStatus.SENDING
    assert campaign.created_by_id == client.user.id


def test_csrf_is_required_for_every_change(login_as, org, template, recipients):
    client = login_as(Role.EDITOR)
    campaign = make_campaign(org)
    no_token = {k: v for k, v in form(client).items() if k != "csrf_token"}
    assert client.post("/campaigns/new", data=no_token).status_code == 303  # back to the form
    assert client.post("/campaigns/new", data=no_token, headers=HX).status_code == 400
    for action in ("launch", "pause", "cancel", "duplicate", "delete", "edit"):
        response = client.post(f"/campaigns/{campaign.id}/{action}", data=no_token)
        assert response.status_code in (303, 400), action
    assert [(c.name, c.status) for c in campaigns_of(org)] == [
        ("Weekly digest", CampaignStatus.DRAFT)
    ]


def test_campaigns_of_another_organization_are_404(login_as, other_org, make_template):
    make_template(other_org, "digest", CONTENT)
    theirs = make_campaign(other_org)
    client = login_as(Role.OWNER)
    for path in ("", "/check", "/edit", "/cancel"):
        assert client.get(f"/campaigns/{theirs.id}{path}").status_code == 404, path
    for action in ("launch", "pause", "resume", "cancel", "duplicate", "delete", "edit"):
        response = client.post(f"/campaigns/{theirs.id}/{action}", data=form(client))
        assert response.status_code == 404, action
    assert client.get(f"/campaigns/{theirs.id}", headers=HX).status_code == 404
    assert campaigns_of(other_org)[0].status == CampaignStatus.DRAFT


# --- list --------------------------------------------------------------------------------------
def test_the_empty_list_says_what_to_do(login_as):
    html = login_as(Role.EDITOR).get("/campaigns").get_data(as_text=True)
    assert "No campaigns yet" in html and 'href="/campaigns/new"' in html
    assert 'aria-current="page">Campaigns' in html


def test_the_list_shows_state_progress_and_rates_from_the_counters(
    login_as, org, template, recipients, jobs
):
    sent = make_campaign(org, "Sent one")
    make_campaign(org, "Still a draft <b>")
    client = login_as(Role.EDITOR)
    client.post(f"/campaigns/{sent.id}/launch", data={"csrf_token": client.csrf})
    jobs()
    html = client.get("/campaigns").get_data(as_text=True)
    assert "Still a draft &lt;b&gt;" in html and "<b>" not in html
    assert 'badge-completed">completed' in html and 'badge-draft">draft' in html
    assert 'max="4" value="4"' in html and "4 / 4" in html

    # Filtered by state: the full page, or only the table for htmx.
    page = client.get("/campaigns", query_string={"state": "draft"}).get_data(as_text=True)
    assert "Still a draft" in page and "Sent one" not in page and "<html" in page
    filter_headers = {**HX, "HX-Target": "campaign-table"}
    fragment = client.get("/campaigns", query_string={"state": "completed"}, headers=filter_headers)
    text = fragment.get_data(as_text=True)
    # Another htmx request (a history restore) gets the whole page.
    assert "<html" in client.get("/campaigns", headers=HX).get_data(as_text=True)
    assert text.lstrip().startswith('<div id="campaign-table">') and "<html" not in text
    assert "Sent one" in text and "Still a draft" not in text
    empty = client.get("/campaigns", query_string={"state": "paused"}).get_data(as_text=True)
    assert "No paused campaigns" in empty
    # An unknown state is ignored, not an error.
    assert client.get("/campaigns", query_string={"state": "nope"}).status_code == 200


def test_the_list_reads_counters_not_the_ledger(login_as, org, template, recipients, jobs):
    campaign = make_campaign(org)
    client = login_as(Role.EDITOR)
    client.post(f"/campaigns/{campaign.id}/launch", data={"csrf_token": client.csrf})
    jobs()
    statements: list[str] = []
    from sqlalchemy import event

    engine = db.engine

    def record(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        assert client.get("/campaigns").status_code == 200
        assert client.get(f"/campaigns/{campaign.id}").status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert not [s for s in statements if "FROM deliveries" in s]


# --- composer ----------------------------------------------------------------------------------
def test_the_composer_offers_published_templates_and_their_channels(
    login_as, org, template, make_template
):
    client = login_as(Role.EDITOR)
    html = client.get("/campaigns/new").get_data(as_text=True)
    assert 'option value="digest"' in html
    channels = client.get("/campaigns/channels", query_string={"template": "digest"})
    text = channels.get_data(as_text=True)
    for channel in ("email", "sms", "push", "in_app"):
        assert f'value="{channel}"' in text
    assert 'value="webhook"' not in text and "<html" not in text
    none = client.get("/campaigns/channels", query_string={"template": "nope"})
    assert "Choose a template to see its channels" in none.get_data(as_text=True)
    assert 'src="/static/js/campaigns.js"' in html and "style=" not in html


def test_a_campaign_with_every_audience_and_timing(login_as, org, template, recipients):
    with organization_scope(org.id):
        segment = Segment(name="Everyone", rules={"op": "and", "rules": []})
        topic = Topic(key="news", name="News")
        db.session.add_all([segment, topic])
        db.session.flush()
    client = login_as(Role.EDITOR)
    cases = [
        ({"audience": "segment", "segment": str(segment.id)}, {"segment_id": segment.id}),
        ({"audience": "topic", "topic": "news"}, {"audience_type": AudienceType.TOPIC}),
        (
            {"audience": "list", "external_ids": "r1, r2\nr3\nr1"},
            {"audience_external_ids": ["r1", "r2", "r3"]},
        ),
        (
            {"when": "at", "send_at": "2099-05-01T09:30", "timezone": "Europe/Berlin"},
            {"send_at": datetime(2099, 5, 1, 7, 30, tzinfo=UTC)},
        ),
        ({"when": "local", "local_time": "09:15"}, {"cron": None}),
        (
            {"when": "cron", "cron": "0 9 * * MON", "timezone": "America/New_York"},
            {"cron": "0 9 * * MON", "cron_timezone": "America/New_York"},
        ),
    ]
    for fields, expected in cases:
        response = client.post("/campaigns/new", data=form(client, **fields))
        assert response.status_code == 303, (fields, response.get_data(as_text=True)[-3000:])
        campaign = campaigns_of(org)[-1]
        for name, value in expected.items():
            assert getattr(campaign, name) == value, (fields, name)
    local = [c for c in campaigns_of(org) if c.local_send_time is not None]
    assert local[0].local_send_time.strftime("%H:%M") == "09:15"


@pytest.mark.parametrize(
    ("fields", "field_id", "message"),
    [
        ({"name": ""}, "name", "Give the campaign a name."),
        ({"template": ""}, "template", "Choose a published template."),
        ({"channels": ["webhook"]}, "channels", "Choose among the template"),
        ({"channels": []}, "channels", "Choose at least one channel."),
        ({"audience": "list", "external_ids": " , "}, "external_ids", "Paste at least one"),
        ({"audience": "segment", "segment": ""}, "segment", "Choose an existing segment."),
        ({"audience": "segment", "segment": "9" * 30}, "segment", "Choose an existing segment."),
        ({"audience": "segment", "segment": "123456"}, "segment", "Choose an existing segment."),
        ({"audience": "topic", "topic": "nope"}, "topic", "Choose an existing topic."),
        ({"when": "at", "send_at": ""}, "send_at", "Give a date and time."),
        ({"when": "at", "send_at": "2001-01-01T10:00"}, "send_at", "in the future"),
        ({"when": "cron", "cron": "every day"}, "cron", "Not a cron expression"),
        ({"when": "local", "local_time": ""}, "local_time", "Give the local time"),
        ({"timezone": "Mars/Olympus"}, "timezone", "Not an IANA time zone."),
        ({"payload": "{nope"}, "payload", "Not valid JSON"),
        ({"payload": "[1, 2]"}, "payload", "Give a JSON object"),
        ({"payload": '{"a": "x\\u0000"}'}, "payload", "Remove the NUL character"),
        ({"name": "a\x00b"}, "name", "Remove the NUL character"),
        ({"audience": "list", "external_ids": "a\x00"}, "external_ids", "Remove the NUL"),
    ],
)
def test_invalid_input_re_renders_the_composer_with_422(
    login_as, org, template, fields, field_id, message
):
    client = login_as(Role.EDITOR)
    response = client.post("/campaigns/new", data=form(client, **fields))
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert f'id="{field_id}-error"' in html, html[-4000:]
    assert message.replace("'", "&#39;") in html
    assert campaigns_of(org) == []


def test_editing_a_draft_and_refusing_a_sent_campaign(login_as, org, template, recipients, redis):
    campaign = make_campaign(org, data={"reason": "x"}, channels=["email", "in_app"])
    client = login_as(Role.EDITOR)
    html = client.get(f"/campaigns/{campaign.id}/edit").get_data(as_text=True)
    assert 'value="Weekly digest"' in html and "&#34;reason&#34;: &#34;x&#34;" in html
    assert re.search(r'value="email"[^>]*checked|checked[^>]*value="email"', html)
    response = client.post(
        f"/campaigns/{campaign.id}/edit",
        data=form(client, name="Renamed", when="cron", cron="0 8 * * *"),
    )
    assert response.status_code == 303
    db.session.refresh(campaign)
    assert (campaign.name, campaign.cron, campaign.channels) == ("Renamed", "0 8 * * *", ["in_app"])
    bad = client.post(f"/campaigns/{campaign.id}/edit", data=form(client, name=""))
    assert bad.status_code == 422
    db.session.refresh(campaign)
    assert campaign.name == "Renamed"

    client.post(f"/campaigns/{campaign.id}/launch", data={"csrf_token": client.csrf})
    db.session.refresh(campaign)
    assert campaign.status == CampaignStatus.SCHEDULED  # cron: waits for its first run
    # A scheduled campaign stays editable (and is rescheduled); a cancelled one is not.
    client.post(f"/campaigns/{campaign.id}/cancel", data={"csrf_token": client.csrf})
    response = client.get(f"/campaigns/{campaign.id}/edit")
    assert response.status_code == 303


def test_the_cron_preview_lists_the_next_runs(login_as):
    client = login_as(Role.VIEWER)
    html = client.get(
        "/campaigns/cron-preview", query_string={"cron": "0 9 * * MON", "timezone": "Europe/Berlin"}
    ).get_data(as_text=True)
    assert html.count("<li>") == 5 and "Mon " in html and "09:00" in html
    assert "Europe/Berlin" in html and "<html" not in html
    bad = client.get("/campaigns/cron-preview", query_string={"cron": "soon"})
    assert "Not a cron expression" in bad.get_data(as_text=True)
    zone = client.get(
        "/campaigns/cron-preview", query_string={"cron": "* * * * *", "timezone": "X"}
    )
    assert "Not an IANA time zone" in zone.get_data(as_text=True)


# --- pre-launch check -------------------------------------------------------------------------
@pytest.fixture
def mixed_audience(org, make_recipient, template):  # type: ignore[no-untyped-def]
    """Recipients each kept out of email by a different rule, plus two who get everything."""
    people = {
        "ok1": make_recipient(org, "ok1", name="Ada", email="ada@example.com"),
        "ok2": make_recipient(org, "ok2", name="Bo", email="bo@example.com"),
        "gone": make_recipient(
            org, "gone", email="gone@example.com", unsubscribed_at=datetime.now(UTC)
        ),
        "bounced": make_recipient(org, "bounced", email="Bounced@Example.com"),
        "prefers_not": make_recipient(org, "prefers_not", email="pn@example.com"),
        "no_email": make_recipient(org, "no_email"),
    }
    with organization_scope(org.id):
        db.session.add_all(
            [
                Suppression(
                    channel=Channel.EMAIL,
                    address="bounced@example.com",
                    reason=SuppressionReason.HARD_BOUNCE,
                ),
                Preference(
                    recipient_id=people["prefers_not"].id, channel=Channel.EMAIL, enabled=False
                ),
            ]
        )
        provider = Provider(
            channel=Channel.EMAIL, kind=ProviderKind.SMTP, name="Mail", rate_limit_per_second=2
        )
        # Not a reachable server: the emails fail, which this check does not look at.
        provider.set_credentials({})
        provider.settings = {"host": "127.0.0.1", "port": 9, "from_email": "news@example.com"}
        db.session.add(provider)
        db.session.flush()
    return people


def test_the_check_counts_what_the_planner_then_suppresses(
    login_as, org, mixed_audience, jobs, statuses_by_channel
):
    campaign = make_campaign(org, channels=["email", "in_app"], data={"reason": "launch"})
    client = login_as(Role.EDITOR)
    response = client.get(f"/campaigns/{campaign.id}/check")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'id="audience-total">6<' in html and 'id="audience-reachable">5<' in html
    assert "about" not in html
    # Samples render as the workers do: the first three recipients by id.
    assert html.count('class="sample card"') == 3
    assert "Hello Ada" in html and "Hi Ada" in html
    # 2 emails at 2/s; in-app has no provider: built in, unlimited.
    assert "Mail · 2/s" in html and "built-in in-app · unlimited" in html
    assert "under a minute" in html

    with organization_scope(org.id):
        counted = count_campaign_audience(campaign.id)
    assert counted.exact
    assert counted.channels["email"] == {
        "queued": 2,
        "suppressed": 4,
        "reasons": {"no_address": 1, "preference": 1, "suppression_list": 1, "unsubscribed": 1},
    }
    assert counted.channels["in_app"] == {
        "queued": 5,
        "suppressed": 1,
        "reasons": {"unsubscribed": 1},
    }

    client.post(f"/campaigns/{campaign.id}/launch", data={"csrf_token": client.csrf})
    jobs()
    planned = statuses_by_channel(campaign.id)
    for channel, entry in counted.channels.items():
        assert planned[channel]["suppressed"] == entry["reasons"], channel
        assert planned[channel]["queued"] == entry["queued"], channel


@pytest.fixture
def statuses_by_channel(org):  # type: ignore[no-untyped-def]
    def read(campaign_id: int) -> dict[str, dict]:
        with organization_scope(org.id):
            rows = db.session.execute(
                select(
                    Delivery.channel,
                    Delivery.status,
                    Delivery.suppression_reason,
                    func.count(),
                )
                .where(Delivery.campaign_id == campaign_id)
                .group_by(Delivery.channel, Delivery.status, Delivery.suppression_reason)
            ).all()
        result: dict[str, dict] = {}
        for channel, status, reason, n in rows:
            entry = result.setdefault(str(channel), {"queued": 0, "suppressed": {}})
            if str(status) == "suppressed":
                entry["suppressed"][str(reason)] = entry["suppressed"].get(str(reason), 0) + n
            else:
                entry["queued"] += n
        return result

    return read


def test_critical_categories_frequency_caps_and_topics_count_like_the_planner(
    org, make_recipient, make_template, jobs, statuses_by_channel, redis
):
    from whistle_web.models import Category, Organization

    with organization_scope(org.id):
        category = Category(key="security", name="Security", critical=True)
        db.session.add(category)
        db.session.flush()
    template = make_template(org, "alert", CONTENT)
    with organization_scope(org.id):
        template.category_id = category.id
        topic = Topic(key="t", name="T")
        db.session.add(topic)
        db.session.flush()
    people = [make_recipient(org, f"p{i}", email=f"p{i}@x.test") for i in range(5)]
    with organization_scope(org.id):
        people[0].unsubscribed_at = datetime.now(UTC)  # critical: sent anyway
        db.session.add(Preference(recipient_id=people[1].id, enabled=False))
        for person in people[:4]:
            db.session.add(Subscription(topic_id=topic.id, recipient_id=person.id))
        db.session.flush()
    campaign = make_campaign(
        org,
        template_key="alert",
        channels=["in_app", "push"],
        audience_type="topic",
        topic_key="t",
    )
    with organization_scope(org.id):
        counted = count_campaign_audience(campaign.id)
    assert counted.recipients == 4 and counted.reachable == 4
    assert counted.channels["push"]["reasons"] == {"no_address": 4}
    assert counted.channels["in_app"] == {"queued": 4, "suppressed": 0, "reasons": {}}

    # A frequency cap, on a non-critical template.
    make_template(org, "plain", CONTENT)
    with organization_scope(org.id):
        db.session.get(Organization, org.id).settings = {"frequency_cap_per_day": 1}
        db.session.flush()
    first = make_campaign(org, template_key="plain", audience_type="list", external_ids=["p2"])
    from whistle_web.campaigns.services import launch_campaign

    with organization_scope(org.id):
        launch_campaign(first.id, actor=SYSTEM)
    jobs()
    second = make_campaign(org, template_key="plain")
    with organization_scope(org.id):
        counted = count_campaign_audience(second.id)
        launch_campaign(second.id, actor=SYSTEM)
    jobs()
    assert counted.channels["in_app"]["reasons"] == {
        "frequency_cap": 1,
        "preference": 1,
        "unsubscribed": 1,
    }
    planned = statuses_by_channel(second.id)
    assert planned["in_app"]["suppressed"] == counted.channels["in_app"]["reasons"]
    assert planned["in_app"]["queued"] == counted.channels["in_app"]["queued"]


def test_a_big_audience_is_estimated_and_said_to_be_about(
    login_as, org, make_recipient, template, monkeypatch
):
    from whistle_web.deliveries import planner

    for i in range(30):
        make_recipient(org, f"b{i:02d}", unsubscribed_at=datetime.now(UTC) if i % 3 == 0 else None)
    campaign = make_campaign(org)
    with organization_scope(org.id):
        request = SendRequest(
            organization_id=org.id,
            template_id=campaign.template_id,
            template_version_id=db.session.get(type(template), template.id).published_version_id,
            audience={"type": "all"},
            channels=["in_app"],
            send_at=datetime.now(UTC),
            cursor_recipient_id=0,
        )
        estimate = count_audience(request, exact_limit=10, sample_size=12)
        exact = count_audience(request)
    assert exact.exact and exact.recipients == 30
    assert exact.channels["in_app"]["reasons"] == {"unsubscribed": 10}
    assert not estimate.exact
    assert estimate.recipients == 30  # ids are dense here: the extrapolation is exact
    assert estimate.channels["in_app"]["reasons"] == {"unsubscribed": 10}
    # The console says "about" when it estimated.
    monkeypatch.setattr(planner, "EXACT_COUNT_LIMIT", 10)
    monkeypatch.setattr(planner, "COUNT_SAMPLE_SIZE", 12)
    html = login_as(Role.VIEWER).get(f"/campaigns/{campaign.id}/check").get_data(as_text=True)
    assert 'id="audience-total">about 30<' in html and "Estimated from a sample" in html


def test_a_count_that_runs_out_of_time_is_estimated(org, make_recipient, template, monkeypatch):
    from whistle_web.deliveries import planner

    for i in range(5):
        make_recipient(org, f"s{i}")
    campaign = make_campaign(org)
    calls = []
    real = planner._timed

    def slow_once(seconds, run):  # type: ignore[no-untyped-def]
        calls.append(seconds)
        return None if len(calls) == 2 else real(seconds, run)  # the exact count times out

    monkeypatch.setattr(planner, "_timed", slow_once)
    with organization_scope(org.id):
        counted = count_campaign_audience(campaign.id)
    assert counted.recipients == 5 and counted.channels["in_app"]["queued"] == 5
    # A real timeout is caught too, and the transaction stays usable.
    with organization_scope(org.id):
        assert real(0.001, lambda: db.session.execute(select(func.pg_sleep(0.2)))) is None
        assert db.session.scalar(select(func.count()).select_from(Campaign)) == 1


def test_the_check_explains_an_unpublished_template(login_as, org, template, recipients):
    campaign = make_campaign(org)
    with organization_scope(org.id):
        db.session.get(type(template), template.id).published_version_id = None
        db.session.flush()
    client = login_as(Role.EDITOR)
    html = client.get(f"/campaigns/{campaign.id}/check").get_data(as_text=True)
    assert "Publish the template before launching." in html
    response = client.post(f"/campaigns/{campaign.id}/launch", data={"csrf_token": client.csrf})
    assert response.status_code == 422
    assert campaigns_of(org)[0].status == CampaignStatus.DRAFT


def test_a_template_error_shows_in_the_sample(login_as, org, make_template, recipients):
    make_template(org, "broken", {"in_app": {"title": "{{ 1 / 0 }}", "body": "x"}})
    campaign = make_campaign(org, template_key="broken")
    html = login_as(Role.EDITOR).get(f"/campaigns/{campaign.id}/check").get_data(as_text=True)
    assert "division by zero" in html


# --- live progress and actions --------------------------------------------------------------
def test_the_page_polls_while_sending_and_stops_when_done(
    login_as, org, template, recipients, jobs
):
    campaign = make_campaign(org)
    client = login_as(Role.EDITOR)
    client.post(f"/campaigns/{campaign.id}/launch", data={"csrf_token": client.csrf})
    page = client.get(f"/campaigns/{campaign.id}").get_data(as_text=True)
    assert 'hx-trigger="every 2s"' in page and "<html" in page
    fragment = client.get(f"/campaigns/{campaign.id}", headers=HX).get_data(as_text=True)
    assert fragment.lstrip().startswith("<") and "<html" not in fragment
    assert 'id="campaign-live"' in fragment and 'hx-trigger="every 2s"' in fragment
    jobs()
    done = client.get(f"/campaigns/{campaign.id}", headers=HX).get_data(as_text=True)
    assert 'data-status="completed"' in done and "every 2s" not in done
    assert 'max="4" value="4"' in done and "4</strong> of 4 sent" in done
    assert 'data-status="completed"' in client.get(f"/campaigns/{campaign.id}").get_data(
        as_text=True
    )
    runs = client.get(f"/campaigns/{campaign.id}").get_data(as_text=True)
    assert "planned" in runs
    # The runs are part of the polled fragment: the run's state updates with it.
    assert '<span class="badge">planned</span>' in done


def test_pause_resume_cancel(login_as, org, template, recipients, redis):
    campaign = make_campaign(org)
    client = login_as(Role.EDITOR)
    client.post(f"/campaigns/{campaign.id}/launch", data={"csrf_token": client.csrf})
    headers = {**HX, "X-CSRFToken": client.csrf}
    paused = client.post(f"/campaigns/{campaign.id}/pause", headers=headers)
    html = paused.get_data(as_text=True)
    assert paused.status_code == 200 and 'data-status="paused"' in html
    assert "Campaign paused." in html and "every 2s" not in html and "<html" not in html
    again = client.post(f"/campaigns/{campaign.id}/pause", headers=headers)
    assert "A paused campaign cannot become paused." in again.get_data(as_text=True)
    resumed = client.post(f"/campaigns/{campaign.id}/resume", data={"csrf_token": client.csrf})
    assert resumed.status_code == 303
    assert campaigns_of(org)[0].status == CampaignStatus.SENDING

    confirm = client.get(f"/campaigns/{campaign.id}/cancel").get_data(as_text=True)
    assert "Yes, cancel the campaign" in confirm
    client.post(f"/campaigns/{campaign.id}/cancel", data={"csrf_token": client.csrf})
    assert campaigns_of(org)[0].status == CampaignStatus.CANCELLED
    page = client.get(f"/campaigns/{campaign.id}").get_data(as_text=True)
    assert "every 2s" not in page and "Campaign cancelled." in page


def test_duplicate_and_delete(login_as, org, template, recipients):
    campaign = make_campaign(org, data={"k": 1}, cron="0 9 * * *", cron_timezone="Asia/Tokyo")
    client = login_as(Role.EDITOR)
    response = client.post(f"/campaigns/{campaign.id}/duplicate", data={"csrf_token": client.csrf})
    assert response.status_code == 303
    original, copy = campaigns_of(org)
    assert response.headers["Location"].endswith(f"/campaigns/{copy.id}/edit")
    assert copy.name == "Copy of Weekly digest" and copy.status == CampaignStatus.DRAFT
    assert (copy.data, copy.cron, copy.cron_timezone) == ({"k": 1}, "0 9 * * *", "Asia/Tokyo")
    deleted = client.post(f"/campaigns/{copy.id}/delete", data={"csrf_token": client.csrf})
    assert deleted.status_code == 303
    assert [c.id for c in campaigns_of(org)] == [original.id]


def test_a_scheduled_campaign_that_cannot_send_now_says_so_where_it_shows(
    login_as, org, template, recipients, redis
):
    soon = datetime.now(UTC) + timedelta(minutes=2)
    later = datetime.now(UTC) + timedelta(days=3)
    campaign = make_campaign(org, send_at=later)
    client = login_as(Role.EDITOR)
    client.post(f"/campaigns/{campaign.id}/launch", data={"csrf_token": client.csrf})
    db.session.refresh(campaign)
    assert campaign.status == CampaignStatus.SCHEDULED
    # Scheduled days ahead: no polling.
    assert "every 2s" not in client.get(f"/campaigns/{campaign.id}").get_data(as_text=True)
    response = client.post(f"/campaigns/{campaign.id}/edit", data=form(client, when="now"))
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert 'id="when-error"' in html and "launch it to send now" in html

    # Due in two minutes: the page polls so it shows the start.
    local = soon.astimezone(UTC).strftime("%Y-%m-%dT%H:%M")
    response = client.post(
        f"/campaigns/{campaign.id}/edit", data=form(client, when="at", send_at=local)
    )
    assert response.status_code == 303, response.get_data(as_text=True)[-2000:]
    assert 'hx-trigger="every 2s"' in client.get(f"/campaigns/{campaign.id}").get_data(as_text=True)


def test_a_channel_without_a_provider_is_flagged(login_as, org, template, recipients):
    campaign = make_campaign(org, channels=["sms", "in_app"])
    html = login_as(Role.EDITOR).get(f"/campaigns/{campaign.id}/check").get_data(as_text=True)
    assert "No enabled provider: these deliveries will fail." in html
    assert "no_address" in html  # nobody here has a phone number


def test_the_most_specific_preference_wins_in_the_count_as_in_the_planner(
    org, make_recipient, make_template, jobs, statuses_by_channel, redis
):
    from whistle_web.models import Category

    with organization_scope(org.id):
        category = Category(key="news", name="News")
        other = Category(key="billing", name="Billing")
        db.session.add_all([category, other])
        db.session.flush()
    template = make_template(org, "news", CONTENT)
    with organization_scope(org.id):
        template.category_id = category.id
        db.session.flush()
    cases = {
        # (category, channel) -> enabled
        "global-off-category-on": {(None, None): False, (category.id, None): True},
        "channel-off-category-on": {(None, Channel.EMAIL): False, (category.id, None): True},
        "category-channel-off": {(category.id, Channel.EMAIL): False, (None, None): True},
        "category-off-channel-on": {(category.id, None): False, (None, Channel.EMAIL): True},
        "other-category-off": {(other.id, None): False},
        "in-app-off": {(None, Channel.IN_APP): False},
    }
    for external_id, prefs in cases.items():
        person = make_recipient(org, external_id, email=f"{external_id}@x.test")
        with organization_scope(org.id):
            for (cat, channel), enabled in prefs.items():
                db.session.add(
                    Preference(
                        recipient_id=person.id, category_id=cat, channel=channel, enabled=enabled
                    )
                )
            db.session.flush()
    campaign = make_campaign(org, template_key="news", channels=["email", "in_app"])
    with organization_scope(org.id):
        counted = count_campaign_audience(campaign.id)
    assert counted.channels["email"]["reasons"] == {"preference": 2}
    assert counted.channels["in_app"]["reasons"] == {"preference": 2}  # in-app-off, category-off
    from whistle_web.campaigns.services import launch_campaign

    with organization_scope(org.id):
        launch_campaign(campaign.id, actor=SYSTEM)
    jobs()
    planned = statuses_by_channel(campaign.id)
    for channel, entry in counted.channels.items():
        assert planned[channel]["suppressed"] == entry["reasons"], channel
        assert planned[channel]["queued"] == entry["queued"], channel


def test_email_samples_carry_the_organization_layout(login_as, org, template, recipients):
    from whistle_web.message_templates.layout import SETTINGS_KEY
    from whistle_web.models import Organization

    with organization_scope(org.id):
        db.session.get(Organization, org.id).settings = {
            SETTINGS_KEY: {"header_html": "<p>Brand for {{ recipient.name }}</p>"}
        }
        db.session.flush()
    campaign = make_campaign(org, channels=["email"])
    html = login_as(Role.VIEWER).get(f"/campaigns/{campaign.id}/check").get_data(as_text=True)
    # Shown as source, escaped: the header rendered for the sample recipient.
    assert "&lt;p&gt;Brand for Person 0&lt;/p&gt;" in html


def test_sample_emails_open_in_a_sandboxed_frame(
    login_as, org, other_org, template, recipients, make_template
):
    campaign = make_campaign(org, channels=["email", "in_app"])
    client = login_as(Role.VIEWER)
    html = client.get(f"/campaigns/{campaign.id}/check").get_data(as_text=True)
    assert f'src="/campaigns/{campaign.id}/check/email/2"' in html and 'sandbox=""' in html
    frame = client.get(f"/campaigns/{campaign.id}/check/email/1")
    assert frame.status_code == 200
    assert frame.headers["Content-Security-Policy"].startswith("sandbox; default-src 'none'")
    assert "Hi Person 1" in frame.get_data(as_text=True)
    assert client.get(f"/campaigns/{campaign.id}/check/email/4").status_code == 404
    in_app_only = make_campaign(org, "In-app only")
    assert client.get(f"/campaigns/{in_app_only.id}/check/email/0").status_code == 404
    make_template(other_org, "digest", CONTENT)
    theirs = make_campaign(other_org, channels=["email"])
    assert client.get(f"/campaigns/{theirs.id}/check/email/0").status_code == 404


def test_ids_beyond_the_database_range_are_404(login_as):
    client = login_as(Role.OWNER)
    huge = 2**63
    for path in ("", "/check", "/edit", "/cancel", "/check/email/0"):
        assert client.get(f"/campaigns/{huge}{path}").status_code == 404, path
    response = client.post(f"/campaigns/{huge}/pause", data={"csrf_token": client.csrf})
    assert response.status_code == 404


@pytest.mark.parametrize("value", ["\x00", "../../etc/passwd", "x" * 5000, "0 0 * * * * * *", "🙂"])
def test_odd_input_never_breaks_the_helpers(login_as, template, value):
    client = login_as(Role.EDITOR)
    for path, params in (
        ("/campaigns/cron-preview", {"cron": value, "timezone": value}),
        ("/campaigns/cron-preview", {"cron": "0 9 * * *", "timezone": value}),
        ("/campaigns/channels", {"template": value}),
        ("/campaigns", {"state": value}),
    ):
        assert client.get(path, query_string=params).status_code == 200, (path, value)
    response = client.post("/campaigns/new", data=form(client, when="cron", cron=value))
    assert response.status_code == 422
