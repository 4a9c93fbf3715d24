"""The recipient's story: History tab, the message as sent, "why not", the search."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from sqlalchemy import func, select, update

from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, run_jobs
from tests.pipeline.test_email import smtp_provider
from tests.smtp_sink import SmtpSink
from whistle_web.accounts.models import Role
from whistle_web.campaigns.models import AudienceType
from whistle_web.campaigns.services import create_campaign, launch_campaign
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.deliveries import story
from whistle_web.deliveries.explain import explain
from whistle_web.deliveries.models import Delivery, DeliveryEvent
from whistle_web.extensions import db
from whistle_web.models import (
    Category,
    Device,
    DeviceKind,
    Organization,
    Preference,
    Provider,
    Suppression,
    SuppressionReason,
)
from whistle_web.notifications.services import trigger
from whistle_web.tenancy import organization_scope

HX = {"HX-Request": "true"}


@pytest.fixture
def jobs(redis):  # type: ignore[no-untyped-def]
    return lambda: run_jobs(redis)


@pytest.fixture
def sink():  # type: ignore[no-untyped-def]
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def in_app(org):  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        provider = Provider(channel=Channel.IN_APP, kind=ProviderKind.IN_APP, name="Inbox")
        provider.set_credentials({})
        db.session.add(provider)
        db.session.flush()
    return provider


def _category(org, key="news", *, critical=False):  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        category = Category(key=key, name=key.title(), critical=critical, default_channels=[])
        db.session.add(category)
        db.session.flush()
    return category


def _template(org, make_template, key="digest", category=None):  # type: ignore[no-untyped-def]
    template = make_template(org, key, CONTENT)
    if category is not None:
        with organization_scope(org.id):
            template.category_id = category.id
            db.session.flush()
    return template


def _launch(org, jobs, channels, *, template_key="digest", name="November digest", **kw):  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        campaign = create_campaign(
            name,
            template_key=template_key,
            channels=channels,
            audience_type=kw.pop("audience_type", AudienceType.ALL),
            actor=SYSTEM,
            **kw,
        )
        launch_campaign(campaign.id, actor=SYSTEM)
    jobs()
    return campaign


def _why(org, recipient, campaign):  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        return explain(recipient.id, campaign.id)


def _by_channel(verdicts):  # type: ignore[no-untyped-def]
    return {v.channel: v for v in verdicts}


# --- "why not": each rule, with real planner runs -----------------------------------------


def test_unsubscribed(org, make_template, make_recipient, jobs):  # type: ignore[no-untyped-def]
    _template(org, make_template)
    gone = make_recipient(org, "gone", email="g@example.com", unsubscribed_at=datetime.now(UTC))
    campaign = _launch(org, jobs, ["email"])
    result = _why(org, gone, campaign)
    assert result.in_audience
    now, ledger = _by_channel(result.now), _by_channel(result.ledger)
    assert now["email"].reason == "unsubscribed"
    assert "unsubscribed from everything on" in now["email"].sentence
    assert ledger["email"].outcome == "suppressed"
    assert "unsubscribed" in ledger["email"].sentence


def test_suppression_list_names_the_bounce(org, make_template, make_recipient, jobs):  # type: ignore[no-untyped-def]
    _template(org, make_template)
    bounced = make_recipient(org, "b", email="Bounced@Example.com")
    with organization_scope(org.id):
        db.session.add(
            Suppression(
                channel=Channel.EMAIL,
                address="bounced@example.com",
                reason=SuppressionReason.HARD_BOUNCE,
            )
        )
        db.session.flush()
    campaign = _launch(org, jobs, ["email"])
    result = _why(org, bounced, campaign)
    verdict = _by_channel(result.now)["email"]
    assert verdict.reason == "suppression_list"
    assert verdict.sentence.startswith("not sent — the address bounced on ")
    assert verdict.sentence.endswith("and is on the suppression list")
    assert _by_channel(result.ledger)["email"].reason == "suppression_list"


def test_preference_names_category_and_channel(org, make_template, make_recipient, jobs):  # type: ignore[no-untyped-def]
    marketing = _category(org, "marketing")
    _template(org, make_template, category=marketing)
    r = make_recipient(org, "p", email="p@example.com", phone="+14155550100")
    with organization_scope(org.id):
        db.session.add(
            Preference(
                recipient_id=r.id, category_id=marketing.id, channel=Channel.SMS, enabled=False
            )
        )
        db.session.flush()
    campaign = _launch(org, jobs, ["sms", "email"])
    with organization_scope(org.id):
        db.session.add(Preference(recipient_id=r.id, channel=Channel.EMAIL, enabled=False))
        db.session.flush()
    result = _why(org, r, campaign)
    now = _by_channel(result.now)
    assert now["sms"].sentence == "not sent — the recipient turned off Marketing by SMS"
    assert now["email"].sentence == "not sent — the recipient turned off Email for every category"
    assert _by_channel(result.ledger)["sms"].reason == "preference"


def test_no_address_and_no_device(org, make_template, make_recipient, jobs):  # type: ignore[no-untyped-def]
    _template(org, make_template)
    r = make_recipient(org, "n")
    campaign = _launch(org, jobs, ["email", "sms", "push"])
    now = _by_channel(_why(org, r, campaign).now)
    assert now["email"].sentence == "not sent — the recipient has no email address"
    assert now["sms"].sentence == "not sent — the recipient has no phone number"
    assert now["push"].sentence.startswith("not sent — no active device")
    assert {v.reason for v in now.values()} == {"no_address"}
    with organization_scope(org.id):
        db.session.add(Device(recipient_id=r.id, kind=DeviceKind.FCM, token="t" * 20))
        db.session.flush()
    assert _by_channel(_why(org, r, campaign).now)["push"].outcome == "send"


def test_frequency_cap(org, make_template, make_recipient, jobs, in_app):  # type: ignore[no-untyped-def]
    _template(org, make_template)
    with organization_scope(org.id):
        db.session.get(Organization, org.id).settings = {"frequency_cap_per_day": 1}
        db.session.flush()
    r = make_recipient(org, "f", name="F")
    first = _launch(org, jobs, ["in_app"], name="First")
    second = _launch(org, jobs, ["in_app"], name="Second")
    first_result = _why(org, r, first)
    assert _by_channel(first_result.ledger)["in_app"].outcome == "sent"
    # its own delivery does not count against it (the second campaign's was suppressed)
    assert _by_channel(first_result.now)["in_app"].outcome == "send"
    result = _why(org, r, second)
    assert _by_channel(result.ledger)["in_app"].reason == "frequency_cap"
    verdict = _by_channel(result.now)["in_app"]
    assert verdict.reason == "frequency_cap"
    assert "1 in-app message in the last 24 hours (at most 1 a day)" in verdict.sentence


def test_critical_category_bypasses(org, make_template, make_recipient, jobs, in_app):  # type: ignore[no-untyped-def]
    security = _category(org, "security", critical=True)
    _template(org, make_template, category=security)
    r = make_recipient(org, "c", name="C", unsubscribed_at=datetime.now(UTC))
    with organization_scope(org.id):
        db.session.add(Preference(recipient_id=r.id, enabled=False))
        db.session.flush()
    campaign = _launch(org, jobs, ["in_app"])
    result = _why(org, r, campaign)
    assert "critical category" in result.critical
    assert _by_channel(result.now)["in_app"].outcome == "send"
    assert _by_channel(result.ledger)["in_app"].sentence.startswith("was sent on ")


def test_not_in_audience(org, make_template, make_recipient, jobs, in_app):  # type: ignore[no-untyped-def]
    _template(org, make_template)
    listed = make_recipient(org, "listed", name="L")
    other = make_recipient(org, "other", name="O")
    campaign = _launch(
        org, jobs, ["in_app"], audience_type=AudienceType.LIST, external_ids=["listed"]
    )
    out = _why(org, other, campaign)
    assert not out.in_audience
    assert "“other” is not on the campaign's list" in out.audience
    assert out.now == [] and out.ledger == []
    assert _why(org, listed, campaign).in_audience
    late = make_recipient(org, "late", name="Late")
    everyone = _launch(org, jobs, ["in_app"], name="Everyone")
    later = make_recipient(org, "later", name="Later")
    assert _why(org, late, everyone).in_audience
    result = _why(org, later, everyone)
    assert not result.in_audience and "created after the launch" in result.audience


def test_was_sent(org, make_template, make_recipient, jobs, sink):  # type: ignore[no-untyped-def]
    _template(org, make_template)
    smtp_provider(org, sink.port, name="Postfix")
    r = make_recipient(org, "ok", name="Ada", email="ada@example.com")
    campaign = _launch(org, jobs, ["email"])
    result = _why(org, r, campaign)
    assert _by_channel(result.now)["email"].sentence == "would be sent"
    ledger = _by_channel(result.ledger)["email"]
    assert ledger.outcome == "sent"
    assert ledger.sentence.startswith("was sent on ") and "via Postfix" in ledger.sentence


# --- views ---------------------------------------------------------------------------------


@pytest.fixture
def sent_email(org, make_template, make_recipient, jobs, sink):  # type: ignore[no-untyped-def]
    """A recipient with one campaign email sent (rendered HTML) and one suppressed SMS."""
    _template(org, make_template)
    smtp_provider(org, sink.port, name="Postfix")
    r = make_recipient(org, "ada", name="Ada", email="ada@example.com")
    campaign = _launch(org, jobs, ["email", "sms"])
    return r, campaign


def _delivery(org, recipient, channel):  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        return db.session.scalar(
            select(Delivery).where(
                Delivery.recipient_id == recipient.id, Delivery.channel == channel
            )
        )


def test_history_shows_the_path(login_as, org, sent_email):  # type: ignore[no-untyped-def]
    r, campaign = sent_email
    email = _delivery(org, r, Channel.EMAIL)
    page = login_as(Role.VIEWER).get(f"/recipients/{r.id}/history")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "November digest" in html and f"/campaigns/{campaign.id}" in html
    assert "Postfix" in html and email.provider_message_id in html
    assert "Suppressed: there was no address or active device for this channel." in html
    assert ">sent<" in html and ">planned<" in html
    # viewers: the path, never the content
    assert "Message as sent" not in html and "Hello Ada" not in html
    frame = f"/recipients/{r.id}/deliveries/{email.id}/message"
    assert login_as(Role.VIEWER).get(frame).status_code == 403

    editor = login_as(Role.EDITOR)
    html = editor.get(f"/recipients/{r.id}/history").get_data(as_text=True)
    assert "Message as sent" in html and "Hello Ada" in html and frame in html
    answer = editor.get(frame)
    assert answer.status_code == 200
    assert "sandbox" in answer.headers["Content-Security-Policy"]
    assert "<a href" in answer.get_data(as_text=True)


def test_profile_has_a_history_tab(login_as, org, make_recipient):  # type: ignore[no-untyped-def]
    r = make_recipient(org, "x")
    html = login_as(Role.VIEWER).get(f"/recipients/{r.id}").get_data(as_text=True)
    assert f"/recipients/{r.id}/history" in html


def test_history_pages_newest_first(
    login_as, org, make_template, make_recipient, monkeypatch, jobs, in_app
):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(story, "PAGE_SIZE", 2)
    make_template(org, "ping", CONTENT)
    r = make_recipient(org, "pager", name="P")
    with organization_scope(org.id):
        for i in range(3):
            trigger(
                "ping",
                to=[r.external_id],
                channels=["in_app"],
                data={"reason": f"n{i}"},
                actor=SYSTEM,
            )
    jobs()
    client = login_as(Role.VIEWER)
    first = client.get(f"/recipients/{r.id}/history").get_data(as_text=True)
    assert first.count('class="story-entry"') == 2
    assert "Load older notifications" in first
    with organization_scope(org.id):
        from whistle_web.notifications.models import Notification

        ids = sorted(db.session.scalars(select(Notification.id)), reverse=True)
    assert first.index(f"notification-{ids[0]}") < first.index(f"notification-{ids[1]}")
    more = client.get(f"/recipients/{r.id}/history?before={ids[1]}", headers=HX)
    body = more.get_data(as_text=True)
    assert "<html" not in body and f"notification-{ids[2]}" in body
    assert "Load older" not in body


def test_foreign_ids_are_404(login_as, org, other_org, make_recipient, make_template, jobs, in_app):  # type: ignore[no-untyped-def]
    mine = make_recipient(org, "mine", name="M")
    theirs = make_recipient(other_org, "theirs")
    make_template(other_org, "digest", CONTENT)
    with organization_scope(other_org.id):
        foreign = create_campaign(
            "Theirs", template_key="digest", channels=["in_app"], audience_type="all", actor=SYSTEM
        )
    client = login_as(Role.OWNER)
    assert client.get(f"/recipients/{theirs.id}/history").status_code == 404
    assert client.get(f"/recipients/{theirs.id}/why-not").status_code == 404
    assert client.get(f"/recipients/{mine.id}/why-not?campaign={foreign.id}").status_code == 404
    assert client.get(f"/recipients/{mine.id}/why-not?campaign=abc").status_code == 404
    assert client.get(f"/recipients/{mine.id}/deliveries/1/message").status_code == 404
    assert (
        client.get(f"/recipients/{mine.id}/history?before=99999999999999999999999").status_code
        == 200
    )


def test_why_not_page_and_fragment(login_as, org, make_template, make_recipient, jobs, in_app):  # type: ignore[no-untyped-def]
    _template(org, make_template)
    r = make_recipient(org, "w", name="W", unsubscribed_at=datetime.now(UTC))
    campaign = _launch(org, jobs, ["in_app"])
    client = login_as(Role.VIEWER)
    page = client.get(f"/recipients/{r.id}/why-not")
    assert page.status_code == 200 and "November digest" in page.get_data(as_text=True)
    full = client.get(f"/recipients/{r.id}/why-not?campaign={campaign.id}").get_data(as_text=True)
    assert "<html" in full and "In-app:</strong> not sent — the recipient unsubscribed" in full
    part = client.get(f"/recipients/{r.id}/why-not?campaign={campaign.id}", headers=HX)
    body = part.get_data(as_text=True)
    assert "<html" not in body and 'id="why-not"' in body and "unsubscribed" in body


def test_search_opens_the_history(login_as, org, make_recipient):  # type: ignore[no-untyped-def]
    ada = make_recipient(org, "ada-1", email="ada@example.com", phone="+14155550123")
    make_recipient(org, "ada-2", email="ada2@example.com")
    client = login_as(Role.VIEWER)
    assert client.get("/recipients/story").status_code == 200
    for q in ("ada@example.com", "+14155550123", "ada-1"):
        answer = client.get("/recipients/story", query_string={"q": q})
        assert answer.status_code == 303, q
        assert answer.headers["Location"].endswith(f"/recipients/{ada.id}/history")
    hx = client.get("/recipients/story", query_string={"q": "ada-1"}, headers=HX)
    assert hx.headers["HX-Redirect"].endswith(f"/recipients/{ada.id}/history")
    several = client.get("/recipients/story", query_string={"q": "ada"}, headers=HX)
    body = several.get_data(as_text=True)
    assert several.status_code == 200 and "<html" not in body and "ada-2" in body
    assert "No recipient matches" in client.get("/recipients/story?q=nobody").get_data(as_text=True)


def test_signed_out_goes_to_login(app, org, make_recipient):  # type: ignore[no-untyped-def]
    r = make_recipient(org, "anon")
    client = app.test_client()
    for url in (f"/recipients/{r.id}/history", f"/recipients/{r.id}/why-not", "/recipients/story"):
        assert client.get(url).status_code == 302


@pytest.mark.parametrize("role", [Role.VIEWER, Role.EDITOR, Role.ADMIN, Role.OWNER])
def test_every_member_reads_the_story(login_as, org, sent_email, role):  # type: ignore[no-untyped-def]
    r, campaign = sent_email
    email = _delivery(org, r, Channel.EMAIL)
    client = login_as(role)
    for url in (
        f"/recipients/{r.id}/history",
        f"/recipients/{r.id}/why-not",
        f"/recipients/{r.id}/why-not?campaign={campaign.id}",
        "/recipients/story?q=nobody",
    ):
        assert client.get(url).status_code == 200, url
    frame = client.get(f"/recipients/{r.id}/deliveries/{email.id}/message")
    assert frame.status_code == (403 if role == Role.VIEWER else 200)
    sms = _delivery(org, r, Channel.SMS)  # suppressed: nothing was rendered
    no_html = client.get(f"/recipients/{r.id}/deliveries/{sms.id}/message")
    assert no_html.status_code == (403 if role == Role.VIEWER else 404)


def test_steps_merge_stamps_and_events_in_time_order(login_as, org, sent_email):  # type: ignore[no-untyped-def]
    r, _ = sent_email
    email = _delivery(org, r, Channel.EMAIL)
    later = email.sent_at + timedelta(minutes=5)
    with organization_scope(org.id):
        db.session.add_all(
            [
                DeliveryEvent(delivery_id=email.id, type="sent", occurred_at=email.sent_at),
                DeliveryEvent(
                    delivery_id=email.id,
                    type="clicked",
                    occurred_at=later + timedelta(minutes=1),
                    data={"url": "https://example.com/x"},
                ),
                DeliveryEvent(delivery_id=email.id, type="opened", occurred_at=later),
            ]
        )
        db.session.flush()
        entries, _ = story.recipient_story(r.id)
    path = next(p for p in entries[0].deliveries if p.delivery.channel == Channel.EMAIL)
    assert [s.name for s in path.steps] == ["planned", "sent", "opened", "clicked"]
    assert path.steps[-1].detail == "https://example.com/x"
    html = login_as(Role.VIEWER).get(f"/recipients/{r.id}/history").get_data(as_text=True)
    assert html.index(">opened<") < html.index(">clicked<")


def test_failed_delivery_shows_attempts_and_error(login_as, org, sent_email):  # type: ignore[no-untyped-def]
    r, _ = sent_email
    sms = _delivery(org, r, Channel.SMS)
    with organization_scope(org.id):
        db.session.execute(
            update(Delivery)
            .where(Delivery.id == sms.id)
            .values(attempts=3, error="provider said no")
        )
        db.session.flush()
    html = login_as(Role.VIEWER).get(f"/recipients/{r.id}/history").get_data(as_text=True)
    assert "provider said no" in html and "<dt>Attempts</dt><dd>3</dd>" in html


def test_quiet_hours_delay_not_drop(org, make_template, make_recipient, jobs, in_app):  # type: ignore[no-untyped-def]
    _template(org, make_template)
    r = make_recipient(
        org,
        "q",
        name="Q",
        timezone="UTC",
        quiet_hours_start=time(0, 0),
        quiet_hours_end=time(23, 59),
    )
    campaign = _launch(org, jobs, ["in_app"])
    result = _why(org, r, campaign)
    now = _by_channel(result.now)["in_app"]
    if datetime.now(UTC).time() < time(23, 58):  # inside the 00:00-23:59 UTC window
        assert now.outcome == "delay"
        assert "held until" in now.sentence and "quiet hours" in now.sentence
        assert _by_channel(result.ledger)["in_app"].sentence.startswith("queued, held until")


def test_a_bounced_step_names_its_reason(login_as, org, sent_email):  # type: ignore[no-untyped-def]
    r, _ = sent_email
    email = _delivery(org, r, Channel.EMAIL)
    with organization_scope(org.id):
        db.session.execute(
            update(Delivery)
            .where(Delivery.id == email.id)
            .values(
                status="bounced",
                bounced_at=func.now(),
                error="550 5.1.1 mailbox unknown",
                failure_reason="hard_bounce",
            )
        )
        db.session.flush()
    html = login_as(Role.VIEWER).get(f"/recipients/{r.id}/history").get_data(as_text=True)
    assert "550 5.1.1 mailbox unknown (hard bounce)" in html
