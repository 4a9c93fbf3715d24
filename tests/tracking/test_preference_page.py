"""The hosted preference page through the test client: plain form posts, no JavaScript."""

from __future__ import annotations

import re
from datetime import time
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from whistle_web.audiences.models import Subscription, Topic
from whistle_web.errors import Actor
from whistle_web.extensions import db
from whistle_web.models import AuditLog, Category, Preference, Recipient
from whistle_web.tenancy import organization_scope
from whistle_web.tracking import links

CHANNELS = ("email", "sms", "push", "in_app")


@pytest.fixture
def secret(app):
    return app.config["SECRET_KEY"]


@pytest.fixture
def catalog(org):
    """Two ordinary categories, one critical one and two topics in ``org``."""
    with organization_scope(org.id):
        rows = {
            "billing": Category(key="billing", name="Billing"),
            "marketing": Category(key="marketing", name="Marketing", description="Offers"),
            "security": Category(key="security", name="Security alerts", critical=True),
            "newsletter": Topic(key="newsletter", name="Monthly newsletter"),
            "releases": Topic(key="releases", name="Release notes"),
        }
        db.session.add_all(rows.values())
        db.session.flush()
    return rows


@pytest.fixture
def recipient(org, make_recipient, catalog):
    recipient = make_recipient(org, "ada", email="ada@example.com", timezone="Europe/Berlin")
    with organization_scope(org.id):
        db.session.add(Subscription(topic_id=catalog["newsletter"].id, recipient_id=recipient.id))
        db.session.flush()
    return recipient


def page_path(secret, org_id, recipient_id) -> str:
    return urlsplit(
        links.preferences_url("https://whistle.example", secret, org_id, recipient_id)
    ).path


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def form_of(html: str) -> dict[str, list[str]]:
    """What a browser would submit from the main form: checked boxes, inputs, hidden fields."""
    main = html[html.index('<input type="hidden" name="action" value="save">') :]
    main = main[: main.index("</form>")]
    data: dict[str, list[str]] = {"csrf_token": [csrf_from(html)], "action": ["save"]}
    for tag in re.findall(r"<input\b[^>]*>", main, re.S):
        name = re.search(r'name="([^"]+)"', tag)
        if name is None or " disabled" in tag or name.group(1) in ("csrf_token", "action"):
            continue
        value = re.search(r'value="([^"]*)"', tag)
        if 'type="checkbox"' in tag and " checked" not in tag:
            continue
        data.setdefault(name.group(1), []).append(value.group(1) if value else "")
    return data


def box(category, channel: str) -> str:
    return f"category-{category.id}-{channel}"


def switches(org, recipient) -> dict[tuple[str | None, str | None], bool]:
    with organization_scope(org.id):
        db.session.expire_all()
        names = {c.id: c.key for c in db.session.scalars(select(Category))}
        rows = db.session.scalars(
            select(Preference).where(Preference.recipient_id == recipient.id)
        ).all()
        return {
            (names.get(p.category_id), str(p.channel) if p.channel else None): p.enabled
            for p in rows
        }


def topics_of(org, recipient) -> set[str]:
    with organization_scope(org.id):
        return set(
            db.session.scalars(
                select(Topic.key)
                .join(Subscription, Subscription.topic_id == Topic.id)
                .where(Subscription.recipient_id == recipient.id)
            )
        )


def stored(org, recipient) -> Recipient:
    with organization_scope(org.id):
        db.session.expire_all()
        return db.session.get(Recipient, recipient.id)


def audit(org) -> list[tuple[str, str, dict]]:
    with organization_scope(org.id):
        entries = db.session.scalars(select(AuditLog).order_by(AuditLog.id)).all()
        return [(a.action, a.actor_label, a.changes) for a in entries]


def test_the_page_shows_categories_by_channel_topics_and_quiet_hours(
    client, org, recipient, catalog, secret
):
    response = client.get(page_path(secret, org.id, recipient.id))
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "same-origin"
    assert response.headers["X-Robots-Tag"] == "noindex"
    html = response.get_data(as_text=True)
    assert "<script" not in html and "style=" not in html  # the strict CSP applies
    assert "Acme" in html and "ada@example.com" in html
    for key in ("billing", "marketing"):
        for channel in CHANNELS:
            assert f'id="{box(catalog[key], channel)}"' in html
            assert f'<label class="visually-hidden" for="{box(catalog[key], channel)}">' in html
    # Critical: shown, checked, locked, and explained.
    security_box = re.search(rf'<input[^>]*id="{box(catalog["security"], "email")}"[^>]*>', html)
    assert security_box and " checked" in security_box.group(0)
    assert " disabled" in security_box.group(0)
    assert "Always on" in html
    assert re.search(r'id="topic-\d+"[^>]*checked[^>]*>\s*<label[^>]*>Monthly newsletter', html)
    assert 'value="Europe/Berlin"' in html
    assert "Unsubscribe from everything" in html
    assert switches(org, recipient) == {}  # a GET changes nothing


def test_saving_the_form_persists_switches_topics_quiet_hours_and_timezone(
    client, org, recipient, catalog, secret
):
    path = page_path(secret, org.id, recipient.id)
    data = form_of(client.get(path).get_data(as_text=True))
    # Marketing off by email and SMS; join release notes, leave the newsletter.
    data.pop(box(catalog["marketing"], "email"))
    data.pop(box(catalog["marketing"], "sms"))
    data.pop(f"topic-{catalog['newsletter'].id}")
    data[f"topic-{catalog['releases'].id}"] = ["on"]
    data.update(quiet_start=["22:00"], quiet_end=["07:30"], timezone=["America/New_York"])

    response = client.post(path, data=data)
    assert response.status_code == 303
    assert urlsplit(response.headers["Location"]).path == path
    assert response.headers["Cache-Control"] == "no-store"

    assert switches(org, recipient) == {("marketing", "email"): False, ("marketing", "sms"): False}
    assert topics_of(org, recipient) == {"releases"}
    saved = stored(org, recipient)
    assert (saved.quiet_hours_start, saved.quiet_hours_end) == (time(22, 0), time(7, 30))
    assert saved.timezone == "America/New_York"
    actions = [(action, label) for action, label, _ in audit(org)]
    assert ("recipient.preferences_updated", "preference page") in actions
    assert ("recipient.updated", "preference page") in actions
    assert ("topic.subscribed", "preference page") in actions
    assert ("topic.unsubscribed", "preference page") in actions

    page = client.get(path).get_data(as_text=True)
    assert "Your preferences are saved." in page
    marketing = re.search(rf'<input[^>]*id="{box(catalog["marketing"], "email")}"[^>]*>', page)
    assert marketing and " checked" not in marketing.group(0)
    assert 'value="22:00"' in page and 'value="07:30"' in page

    # Sending the same page back changes nothing and records nothing more.
    before = len(audit(org))
    assert client.post(path, data=form_of(page)).status_code == 303
    assert len(audit(org)) == before
    # Turning marketing email back on, clearing quiet hours.
    data = form_of(page)
    data[box(catalog["marketing"], "email")] = ["on"]
    data.update(quiet_start=[""], quiet_end=[""])
    assert client.post(path, data=data).status_code == 303
    assert switches(org, recipient) == {("marketing", "email"): True, ("marketing", "sms"): False}
    assert stored(org, recipient).quiet_hours_start is None


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"timezone": "Mars/Olympus_Mons"}, "timezone", "Not a known time zone"),
        ({"timezone": "../../etc/passwd"}, "timezone", "Not a known time zone"),
        ({"timezone": "Europe/Berlin\x00"}, "timezone", "Not a known time zone"),
        ({"quiet_start": "25:00", "quiet_end": "07:00"}, "quiet_start", "Use a time like"),
        ({"quiet_start": "22:00", "quiet_end": "soon"}, "quiet_end", "Use a time like"),
        ({"quiet_start": "22:00", "quiet_end": ""}, "quiet_end", "Give both a start and an end"),
        ({"quiet_start": "22:00", "quiet_end": "22:00"}, "quiet_end", "must differ"),
    ],
)
def test_bad_input_is_shown_again_with_a_message_and_nothing_is_saved(
    client, org, recipient, catalog, secret, changes, field, message
):
    path = page_path(secret, org.id, recipient.id)
    data = form_of(client.get(path).get_data(as_text=True))
    data.pop(box(catalog["billing"], "email"))  # a valid change next to the bad one
    data[f"topic-{catalog['releases'].id}"] = ["on"]
    data.update({k: [v] for k, v in changes.items()})

    response = client.post(path, data=data)
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert "Nothing was saved" in html and message in html
    assert re.search(rf'id="{field}"[^>]*aria-invalid="true"', html)
    # The person's other edits are kept on the re-rendered form.
    billing = re.search(rf'<input[^>]*id="{box(catalog["billing"], "email")}"[^>]*>', html)
    assert billing and " checked" not in billing.group(0)

    assert switches(org, recipient) == {}
    assert topics_of(org, recipient) == {"newsletter"}
    saved = stored(org, recipient)
    assert saved.timezone == "Europe/Berlin" and saved.quiet_hours_start is None
    assert audit(org) == []


def test_critical_categories_stay_on_whatever_is_posted(client, org, recipient, catalog, secret):
    path = page_path(secret, org.id, recipient.id)
    data = form_of(client.get(path).get_data(as_text=True))
    assert box(catalog["security"], "email") not in data  # disabled boxes are not sent
    # A hand-made post that names the critical category is ignored, not obeyed.
    data["shown"].append(f"category-{catalog['security'].id}")
    assert client.post(path, data=data).status_code == 303
    assert switches(org, recipient) == {}
    page = client.get(path).get_data(as_text=True)
    security = re.search(rf'<input[^>]*id="{box(catalog["security"], "sms")}"[^>]*>', page)
    assert security and " checked" in security.group(0) and " disabled" in security.group(0)


def test_a_category_added_while_the_page_was_open_is_not_switched_off(
    client, org, recipient, catalog, secret
):
    path = page_path(secret, org.id, recipient.id)
    data = form_of(client.get(path).get_data(as_text=True))
    with organization_scope(org.id):
        db.session.add(Category(key="comments", name="Comments"))
        db.session.add(Topic(key="events", name="Events"))
        db.session.flush()
    assert client.post(path, data=data).status_code == 303
    assert switches(org, recipient) == {}
    assert topics_of(org, recipient) == {"newsletter"}


def test_unsubscribe_from_everything_and_resubscribe(client, org, recipient, secret):
    path = page_path(secret, org.id, recipient.id)
    html = client.get(path).get_data(as_text=True)
    response = client.post(path, data={"csrf_token": csrf_from(html), "action": "unsubscribe"})
    assert response.status_code == 303
    assert stored(org, recipient).unsubscribed_at is not None
    page = client.get(path).get_data(as_text=True)
    assert "You are unsubscribed" in page and "Resubscribe" in page
    assert [(a, c) for a, _, c in audit(org)] == [
        ("recipient.preferences_updated", {"unsubscribed": True})
    ]

    response = client.post(path, data={"csrf_token": csrf_from(page), "action": "resubscribe"})
    assert response.status_code == 303
    assert stored(org, recipient).unsubscribed_at is None
    assert "You are subscribed again." in client.get(path).get_data(as_text=True)
    assert audit(org)[-1][2] == {"unsubscribed": False}


def test_an_unknown_action_changes_nothing(client, org, recipient, secret):
    path = page_path(secret, org.id, recipient.id)
    html = client.get(path).get_data(as_text=True)
    response = client.post(path, data={"csrf_token": csrf_from(html), "action": "delete"})
    assert response.status_code == 303
    assert "not known" in client.get(path).get_data(as_text=True)
    assert audit(org) == []


def test_the_form_needs_its_csrf_token(client, org, recipient, catalog, secret):
    path = page_path(secret, org.id, recipient.id)
    data = form_of(client.get(path).get_data(as_text=True))
    data.pop(box(catalog["billing"], "email"))
    for token in ([], ["forged"]):
        response = client.post(path, data={**data, "csrf_token": token})
        assert response.status_code == 303
        assert urlsplit(response.headers["Location"]).path == path
    unsubscribe = client.post(path, data={"action": "unsubscribe"})
    assert unsubscribe.status_code == 303
    assert switches(org, recipient) == {}
    assert stored(org, recipient).unsubscribed_at is None
    assert "The form expired" in client.get(path).get_data(as_text=True)


def test_tampered_and_foreign_tokens_are_the_invalid_link_page(client, org, recipient, secret, app):
    path = page_path(secret, org.id, recipient.id)
    tampered = path[:-1] + ("A" if path[-1] != "A" else "B")
    unsubscribe_token = urlsplit(links.unsubscribe_url("", secret, org.id, recipient.id)).path
    other_secret = page_path("another-secret-entirely-0123456789", org.id, recipient.id)
    for bad in (tampered, "/p/nonsense", "/p/" + unsubscribe_token.rsplit("/", 1)[1], other_secret):
        response = client.get(bad)
        assert response.status_code == 404
        assert "This link is not valid" in response.get_data(as_text=True)
        assert response.headers["Cache-Control"] == "no-store"
        assert client.post(bad, data={"action": "unsubscribe"}).status_code in (303, 404)
    assert stored(org, recipient).unsubscribed_at is None


def test_a_token_for_one_organization_never_touches_another(
    client, org, other_org, recipient, make_recipient, secret
):
    # Organization B's link naming organization A's recipient id: looked up inside B only.
    foreign = page_path(secret, other_org.id, recipient.id)
    assert client.get(foreign).status_code == 404
    with organization_scope(other_org.id):
        db.session.add(Category(key="billing", name="B billing"))
        db.session.flush()
    bob = make_recipient(other_org, "bob")
    own_b = client.get(page_path(secret, other_org.id, bob.id)).get_data(as_text=True)
    assert "B billing" in own_b and "Monthly newsletter" not in own_b and "Acme" not in own_b
    response = client.post(foreign, data={"csrf_token": csrf_from(own_b), "action": "unsubscribe"})
    assert response.status_code == 404
    data = form_of(own_b)
    assert client.post(foreign, data=data).status_code == 404
    assert stored(org, recipient).unsubscribed_at is None
    assert switches(org, recipient) == {}
    assert audit(org) == [] and audit(other_org) == []


def test_the_unsubscribe_page_links_to_the_preference_page(client, org, recipient, secret):
    unsubscribe = urlsplit(links.unsubscribe_url("", secret, org.id, recipient.id)).path
    html = client.get(unsubscribe).get_data(as_text=True)
    href = re.search(r'href="(/p/[^"]+)"', html)
    assert href is not None
    assert client.get(href.group(1)).status_code == 200
    assert href.group(1) == page_path(secret, org.id, recipient.id)


def test_one_click_unsubscribe_still_works(client, org, recipient, secret):
    path = urlsplit(links.unsubscribe_url("", secret, org.id, recipient.id)).path
    response = client.post(path, data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert stored(org, recipient).unsubscribed_at is not None


def test_every_email_can_link_the_preference_page(
    app, org, recipient, make_template, secret, redis
):
    """``preferences_url`` renders to this recipient's page (not click-tracked), end to end."""
    from tests.pipeline.conftest import run_jobs
    from tests.pipeline.test_email import smtp_provider
    from tests.smtp_sink import SmtpSink
    from whistle_web.message_templates.services import check_content
    from whistle_web.notifications.services import trigger

    content = {
        "email": {
            "subject": "Hi",
            "text": "Manage what you get: {{ preferences_url }}",
            "html": "<p>Hi</p><a href='{{ preferences_url }}'>Preferences</a>",
        }
    }
    assert check_content(content) == []
    make_template(org, "digest", content)
    with SmtpSink() as sink:
        smtp_provider(org, sink.port)
        with organization_scope(org.id):
            trigger("digest", to=["ada"], channels=["email"], actor=Actor.system("tests"))
        run_jobs(redis)
    (message,) = sink.messages
    text = next(p for p in message.walk() if p.get_content_type() == "text/plain").get_content()
    html = next(p for p in message.walk() if p.get_content_type() == "text/html").get_content()
    url = re.search(r"(https?://\S+/p/[\w.-]+)", text).group(1)
    assert url.startswith(app.config["WHISTLE_BASE_URL"])
    assert f"href='{url}'" in html  # Whistle's own page: not routed through a click redirect
    token = urlsplit(url).path.removeprefix("/p/")
    assert links.verify_preferences(token, secret=secret) == links.LinkPayload(
        "preferences", org.id, recipient_id=recipient.id
    )


def test_the_preferences_link_costs_nothing_when_unused():
    import json

    from whistle_web.deliveries.dispatch import _channel_template

    used = {"email": {"subject": "Hi", "text": "{{ preferences_url }}", "html": "<p>x</p>"}}
    plain = {"email": {"subject": "Hi", "text": "{{ recipient.name }}", "html": "<p>x</p>"}}
    assert _channel_template(10_000_001, json.dumps(used), "email").uses_preferences_url
    template = _channel_template(10_000_002, json.dumps(plain), "email")
    assert not template.uses_preferences_url and not template.uses_unsubscribe_url
