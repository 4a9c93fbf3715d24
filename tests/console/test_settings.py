"""Settings pages: providers, API keys, team, categories, topics, organization."""

from __future__ import annotations

import logging
import re

import pytest
from flask import g, has_app_context
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.console.conftest import csrf_token
from tests.factories import PASSWORD, SYSTEM
from tests.smtp_sink import SmtpSink
from whistle_web.accounts.models import ApiKey, Membership, Role
from whistle_web.accounts.services import create_api_key
from whistle_web.audiences.models import Topic
from whistle_web.channels.models import Provider
from whistle_web.channels.services import create_provider
from whistle_web.extensions import db
from whistle_web.organizations.models import AuditLog, Organization
from whistle_web.preferences.models import Category
from whistle_web.preferences.services import issue_recipient_token, verify_recipient_token
from whistle_web.tenancy import organization_scope, unscoped

SECRET_PASSWORD = "s3cret-SMTP-passw0rd-never-shown"
VIEWER_PAGES = [
    "/settings",
    "/settings/providers",
    "/settings/team",
    "/settings/categories",
    "/settings/topics",
    "/settings/organization",
]
MANAGE_PAGES = [
    "/settings/api-keys",
    "/settings/providers/new",
    "/settings/providers/new?kind=smtp",
]


@pytest.fixture(autouse=True)
def one_user_per_client(monkeypatch):
    """Each test runs inside one app context, so requests share ``g``, where Flask-Login
    caches the signed-in user and Flask-WTF the CSRF token: forget both before each request
    so several clients (an owner and an admin, a guest) each act as themselves."""
    original = FlaskClient.open

    def open_(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if has_app_context():
            g.pop("_login_user", None)
            g.pop("csrf_token", None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlaskClient, "open", open_)


def smtp_provider(org, name="Mailer", **extra):
    with organization_scope(org.id):
        return create_provider(
            channel="email",
            kind="smtp",
            name=name,
            config={
                "host": "127.0.0.1",
                "port": 2525,
                "use_tls": "none",
                "from_email": "hi@acme.io",
                "username": "mailer",
                "password": SECRET_PASSWORD,
                **extra,
            },
            actor=SYSTEM,
        )


def post(client, path, data=None, **kwargs):
    return client.post(path, data={"csrf_token": client.csrf, **(data or {})}, **kwargs)


# --- access --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", VIEWER_PAGES)
@pytest.mark.parametrize("role", list(Role))
def test_harmless_pages_are_open_to_every_member(login_as, role, path):
    assert login_as(role).get(path).status_code == 200


@pytest.mark.parametrize("path", MANAGE_PAGES)
@pytest.mark.parametrize(
    ("role", "status"),
    [(Role.VIEWER, 403), (Role.EDITOR, 403), (Role.ADMIN, 200), (Role.OWNER, 200)],
)
def test_managing_pages_need_admin(login_as, role, status, path):
    assert login_as(role).get(path).status_code == status


@pytest.mark.parametrize(
    "path",
    [
        "/settings/providers/new",
        "/settings/api-keys",
        "/settings/team/invite",
        "/settings/categories",
        "/settings/topics",
        "/settings/organization",
        "/settings/organization/widget-secret",
    ],
)
@pytest.mark.parametrize("role", [Role.VIEWER, Role.EDITOR])
def test_changes_are_refused_below_admin(login_as, role, path):
    client = login_as(role)
    assert post(client, path, {"name": "x"}).status_code == 403


def test_anonymous_users_are_sent_to_sign_in(client):
    response = client.get("/settings")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_posts_without_a_csrf_token_are_refused(login_as, org):
    client = login_as(Role.ADMIN)
    provider = smtp_provider(org)
    for path, data in (
        ("/settings/api-keys", {"name": "k", "scopes": ["recipients:read"]}),
        (f"/settings/providers/{provider.id}/toggle", {}),
        ("/settings/topics", {"key": "t", "name": "T"}),
        ("/settings/organization", {"name": "Renamed"}),
    ):
        response = client.post(path, data=data)
        assert response.status_code == 303, path
        assert "The form expired" in client.get("/settings").get_data(as_text=True)
    with organization_scope(org.id):
        assert db.session.scalar(select(db.func.count()).select_from(ApiKey)) == 0
        assert db.session.scalar(select(db.func.count()).select_from(Topic)) == 0
        db.session.refresh(provider)
        assert provider.enabled
    db.session.refresh(org)
    assert org.name == "Acme"


def test_the_overview_links_every_page_and_the_nav_shows_settings(login_as):
    page = login_as(Role.ADMIN).get("/settings").get_data(as_text=True)
    for path in ["/settings/providers", "/settings/api-keys", "/settings/team"]:
        assert f'href="{path}"' in page
    assert 'aria-current="page">Settings</a>' in page
    viewer_page = login_as(Role.VIEWER).get("/settings").get_data(as_text=True)
    assert "/settings/api-keys" not in viewer_page


# --- providers -----------------------------------------------------------------------------


def test_providers_are_listed_per_channel_and_credentials_never_appear(login_as, org):
    provider = smtp_provider(org)
    client = login_as(Role.ADMIN)
    for path in [
        "/settings/providers",
        f"/settings/providers/{provider.id}",
        "/settings/providers/new?kind=smtp",
        "/settings",
        "/operations/audit",
    ]:
        page = client.get(path).get_data(as_text=True)
        assert SECRET_PASSWORD not in page, path
    edit = client.get(f"/settings/providers/{provider.id}").get_data(as_text=True)
    assert 'value="127.0.0.1"' in edit  # settings are shown back
    assert "badge-set" in edit and "leave empty to keep it" in edit
    listing = client.get("/settings/providers").get_data(as_text=True)
    assert "Mailer" in listing and 'id="channel-email"' in listing and 'id="channel-sms"' in listing


def test_add_a_provider_then_a_bad_one_re_renders_without_echoing_secrets(login_as, org):
    client = login_as(Role.ADMIN)
    response = post(
        client,
        "/settings/providers/new",
        {
            "kind": "smtp",
            "name": "Primary SMTP",
            "config.host": "smtp.acme.io",
            "config.port": "587",
            "config.from_email": "hi@acme.io",
            "config.username": "u",
            "config.password": SECRET_PASSWORD,
            "rate_limit_per_second": "5",
            "enabled": "on",
        },
    )
    assert response.status_code == 303
    with organization_scope(org.id):
        provider = db.session.scalar(select(Provider).where(Provider.name == "Primary SMTP"))
        assert provider.settings["port"] == 587
        assert provider.get_credentials()["password"] == SECRET_PASSWORD
        assert provider.rate_limit_per_second == 5
    bad = post(
        client,
        "/settings/providers/new",
        {
            "kind": "smtp",
            "name": "Primary SMTP",
            "config.port": "99999",
            "config.password": SECRET_PASSWORD,
        },
    )
    page = bad.get_data(as_text=True)
    assert bad.status_code == 422
    assert SECRET_PASSWORD not in page
    assert "already exists" in page and "This setting is required." in page
    assert "Must be a port number" in page
    bad_rate = post(
        client,
        "/settings/providers/new",
        {"kind": "in_app", "name": "x", "rate_limit_per_second": "-1"},
    )
    assert bad_rate.status_code == 422 and "messages per second" in bad_rate.get_data(as_text=True)
    with organization_scope(org.id):
        assert db.session.scalar(select(db.func.count()).select_from(Provider)) == 1


def test_unknown_kind_is_422(login_as):
    client = login_as(Role.ADMIN)
    assert client.get("/settings/providers/new?kind=pigeon").status_code == 422
    assert post(client, "/settings/providers/new", {"kind": "pigeon"}).status_code == 422


def test_kind_fields_come_as_a_fragment_for_htmx(login_as):
    client = login_as(Role.ADMIN)
    fragment = client.get("/settings/providers/new?kind=twilio", headers={"HX-Request": "true"})
    html = fragment.get_data(as_text=True)
    assert fragment.status_code == 200 and "<html" not in html
    assert 'name="config.account_sid"' in html and 'type="password"' in html
    full = client.get("/settings/providers/new?kind=twilio").get_data(as_text=True)
    assert "<html" in full


def test_editing_keeps_credentials_left_empty_and_replaces_typed_ones(login_as, org):
    provider = smtp_provider(org)
    client = login_as(Role.ADMIN)
    form = {
        "name": "Mailer 2",
        "config.host": "127.0.0.1",
        "config.from_email": "hi@acme.io",
        "config.username": "",
        "config.password": "",
        "rate_limit_per_second": "",
        "enabled": "on",
    }
    assert post(client, f"/settings/providers/{provider.id}", form).status_code == 303
    with organization_scope(org.id):
        db.session.refresh(provider)
        assert provider.name == "Mailer 2"
        assert provider.get_credentials()["password"] == SECRET_PASSWORD
        assert "port" not in provider.settings  # a blank setting is removed
    form["config.password"] = "new-password-123"
    assert post(client, f"/settings/providers/{provider.id}", form).status_code == 303
    with organization_scope(org.id):
        db.session.refresh(provider)
        assert provider.get_credentials()["password"] == "new-password-123"
    form["config.from_email"] = "not an address"
    response = post(client, f"/settings/providers/{provider.id}", form)
    assert response.status_code == 422
    assert "new-password-123" not in response.get_data(as_text=True)


def test_move_toggle_and_delete_with_htmx_fragments(login_as, org):
    first = smtp_provider(org, "First")
    second = smtp_provider(org, "Second")
    client = login_as(Role.ADMIN)
    hx = {"HX-Request": "true"}
    response = post(
        client, f"/settings/providers/{second.id}/move", {"direction": "up"}, headers=hx
    )
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and "<html" not in html
    assert html.index("Second") < html.index("First")
    with organization_scope(org.id):
        db.session.refresh(first)
        db.session.refresh(second)
        assert second.priority < first.priority
    response = post(client, f"/settings/providers/{first.id}/toggle", headers=hx)
    assert "Enable" in response.get_data(as_text=True)
    with organization_scope(org.id):
        db.session.refresh(first)
        assert first.enabled is False
    response = post(client, f"/settings/providers/{first.id}/move", {"direction": "sideways"})
    assert response.status_code == 422
    response = post(client, f"/settings/providers/{first.id}/delete")
    assert response.status_code == 303
    with organization_scope(org.id):
        assert db.session.get(Provider, first.id) is None


def test_test_send_reaches_a_real_smtp_server(login_as, org):
    with SmtpSink() as sink:
        provider = smtp_provider(org, port=sink.port, username=None, password=None)
        client = login_as(Role.ADMIN)
        response = post(
            client,
            f"/settings/providers/{provider.id}/test",
            {"to": "ops@acme.io"},
            headers={"HX-Request": "true"},
        )
        html = response.get_data(as_text=True)
        assert response.status_code == 200 and "Sent." in html and "<html" not in html
        assert sink.messages and sink.messages[0]["To"] == "ops@acme.io"
    bad = post(client, f"/settings/providers/{provider.id}/test", {"to": "nobody"})
    assert bad.status_code == 422 and "<html" in bad.get_data(as_text=True)
    assert SECRET_PASSWORD not in bad.get_data(as_text=True)


def test_push_test_sends_take_device_data_as_json(login_as, org):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with organization_scope(org.id):
        provider = create_provider(
            channel="push",
            kind="webpush",
            name="Browsers",
            config={"vapid_subject": "mailto:ops@acme.io", "vapid_private_key": key.decode()},
            actor=SYSTEM,
        )
    client = login_as(Role.ADMIN)
    page = client.get(f"/settings/providers/{provider.id}").get_data(as_text=True)
    assert 'name="device_data"' in page and "PRIVATE KEY" not in page
    response = post(
        client,
        f"/settings/providers/{provider.id}/test",
        {"to": "https://push.example/x", "device_data": "[1, 2]"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 422 and "JSON object" in response.get_data(as_text=True)


def test_viewers_see_providers_without_the_buttons_that_change_them(login_as, org):
    smtp_provider(org)
    page = login_as(Role.VIEWER).get("/settings/providers").get_data(as_text=True)
    assert "Mailer" in page
    assert "Disable" not in page and "Add a provider" not in page and "/move" not in page


def test_foreign_providers_are_404(login_as, other_org):
    foreign = smtp_provider(other_org)
    client = login_as(Role.OWNER)
    assert client.get(f"/settings/providers/{foreign.id}").status_code == 404
    for action in ("move", "toggle", "delete", "test"):
        response = post(client, f"/settings/providers/{foreign.id}/{action}", {"direction": "up"})
        assert response.status_code == 404, action
    assert client.get(f"/settings/providers/{2**70}").status_code == 404
    assert "Mailer" not in client.get("/settings/providers").get_data(as_text=True)


# --- API keys --------------------------------------------------------------------------------


def test_create_a_key_shows_the_secret_once_and_revoking_gets_401_at_once(login_as, org, app):
    client = login_as(Role.ADMIN)
    response = post(
        client,
        "/settings/api-keys",
        {"name": "Backend", "scopes": ["recipients:read", "providers:read"]},
    )
    page = response.get_data(as_text=True)
    assert response.status_code == 201
    assert response.headers["Cache-Control"] == "no-store"
    secret = re.search(r'value="(whk_[^"]+)"', page).group(1)
    api = app.test_client()
    auth = {"Authorization": f"Bearer {secret}"}
    assert api.get("/api/v1/providers", headers=auth).status_code == 200
    listing = client.get("/settings/api-keys").get_data(as_text=True)
    assert secret not in listing and secret.split("_")[1] in listing
    with organization_scope(org.id):
        key = db.session.scalar(select(ApiKey).where(ApiKey.name == "Backend"))
        assert key.scopes == ["providers:read", "recipients:read"]
    response = post(client, f"/settings/api-keys/{key.id}/revoke", headers={"HX-Request": "true"})
    assert response.status_code == 200 and "revoked" in response.get_data(as_text=True)
    assert api.get("/api/v1/providers", headers=auth).status_code == 401


def test_a_key_needs_a_name_and_known_scopes(login_as):
    client = login_as(Role.ADMIN)
    response = post(client, "/settings/api-keys", {"name": "", "scopes": ["root"]})
    assert response.status_code == 422
    assert "Give the key a name." in response.get_data(as_text=True)
    response = post(client, "/settings/api-keys", {"name": "x"})
    assert response.status_code == 422 and "at least one scope" in response.get_data(as_text=True)


def test_foreign_keys_are_404(login_as, other_org):
    with organization_scope(other_org.id):
        issued = create_api_key("Theirs", actor=SYSTEM)
    client = login_as(Role.OWNER)
    assert post(client, f"/settings/api-keys/{issued.api_key.id}/revoke").status_code == 404
    assert post(client, f"/settings/api-keys/{2**70}/revoke").status_code == 404
    assert "Theirs" not in client.get("/settings/api-keys").get_data(as_text=True)


# --- team ------------------------------------------------------------------------------------


def members(org):
    with organization_scope(org.id):
        return {m.user_id: Role(m.role) for m in db.session.scalars(select(Membership))}


def test_the_last_owner_can_be_neither_demoted_nor_removed(login_as, org):
    owner = login_as(Role.OWNER)
    me = owner.user.id
    response = post(owner, f"/settings/team/{me}/role", {"role": "admin"})
    assert response.status_code == 409 and "last owner" in response.get_data(as_text=True)
    assert post(owner, f"/settings/team/{me}/remove").status_code == 409
    assert members(org)[me] == Role.OWNER
    second = login_as(Role.OWNER)
    assert (
        post(owner, f"/settings/team/{second.user.id}/role", {"role": "admin"}).status_code == 303
    )
    assert members(org)[second.user.id] == Role.ADMIN


def test_only_owners_make_or_change_owners(login_as, org):
    admin = login_as(Role.ADMIN)
    owner = login_as(Role.OWNER)
    editor = login_as(Role.EDITOR)
    response = post(admin, f"/settings/team/{editor.user.id}/role", {"role": "owner"})
    assert response.status_code == 403
    assert (
        post(admin, f"/settings/team/{owner.user.id}/role", {"role": "viewer"}).status_code == 403
    )
    assert post(admin, f"/settings/team/{owner.user.id}/remove").status_code == 403
    hx = post(
        admin,
        f"/settings/team/{editor.user.id}/role",
        {"role": "viewer"},
        headers={"HX-Request": "true"},
    )
    assert hx.status_code == 200 and "<html" not in hx.get_data(as_text=True)
    assert members(org)[editor.user.id] == Role.VIEWER
    assert post(admin, f"/settings/team/{editor.user.id}/role", {"role": "boss"}).status_code == 422
    assert post(admin, f"/settings/team/{editor.user.id}/remove").status_code == 303
    assert editor.user.id not in members(org)


def test_foreign_members_are_404(login_as, other_org, make_user):
    stranger = make_user(org=other_org, role=Role.EDITOR)
    client = login_as(Role.OWNER)
    assert post(client, f"/settings/team/{stranger.id}/role", {"role": "viewer"}).status_code == 404
    assert post(client, f"/settings/team/{stranger.id}/remove").status_code == 404
    assert stranger.email not in client.get("/settings/team").get_data(as_text=True)


@pytest.fixture
def mail_log(caplog, monkeypatch):
    """Capture the system mail's INFO lines (Alembic's logging setup during the session's
    migrations disables loggers that existed before it)."""
    logger = logging.getLogger("whistle_web.system_mail")
    monkeypatch.setattr(logger, "disabled", False)
    caplog.set_level("INFO", logger=logger.name)
    return caplog


def invitation_link(caplog) -> str:
    for record in caplog.records:
        match = re.search(r"http://whistle\.test(/settings/invitations/\S+)", record.getMessage())
        if match:
            return match.group(1)
    raise AssertionError("no invitation link was logged")


def test_an_invitation_is_emailed_and_works_once(login_as, org, app, mail_log):
    admin = login_as(Role.ADMIN)
    response = post(
        admin, "/settings/team/invite", {"email": "New.Person@Acme.io", "role": "editor"}
    )
    assert response.status_code == 303
    assert "new.person@acme.io" in admin.get("/settings/team").get_data(as_text=True)
    link = invitation_link(mail_log)
    guest = app.test_client()
    page = guest.get(link)
    assert page.status_code == 200 and "Acme" in page.get_data(as_text=True)
    token = csrf_token(guest, link)
    short = guest.post(
        link, data={"csrf_token": token, "password": "short", "password_again": "short"}
    )
    assert short.status_code == 422
    accepted = guest.post(
        link,
        data={"csrf_token": token, "password": PASSWORD, "password_again": PASSWORD, "name": "New"},
    )
    assert accepted.status_code == 303
    assert guest.get("/settings/team").status_code == 200  # signed in as the new member
    assert Role.EDITOR in members(org).values()
    again = app.test_client().get(link)
    assert again.status_code == 404
    # Removed later, the same link still does not let them back in.
    with organization_scope(org.id):
        user_id = db.session.scalar(
            select(Membership.user_id).join(Membership.user).where(Membership.role == Role.EDITOR)
        )
    assert post(admin, f"/settings/team/{user_id}/remove").status_code == 303
    assert app.test_client().get(link).status_code == 404


def test_invitation_errors(login_as, org, app, mail_log):
    admin = login_as(Role.ADMIN)
    assert (
        post(admin, "/settings/team/invite", {"email": "nope", "role": "editor"}).status_code == 422
    )
    already = post(admin, "/settings/team/invite", {"email": admin.user.email, "role": "editor"})
    assert already.status_code == 422 and "already a member" in already.get_data(as_text=True)
    assert (
        post(admin, "/settings/team/invite", {"email": "a@acme.io", "role": "owner"}).status_code
        == 403
    )
    assert app.test_client().get("/settings/invitations/forged.token").status_code == 404
    post(admin, "/settings/team/invite", {"email": "b@acme.io", "role": "viewer"})
    link = invitation_link(mail_log)
    page = admin.get("/settings/team").get_data(as_text=True)
    invitation_id = re.search(r"/settings/team/invitations/([^/]+)/revoke", page).group(1)
    assert post(admin, f"/settings/team/invitations/{invitation_id}/revoke").status_code == 303
    assert app.test_client().get(link).status_code == 404
    assert post(admin, "/settings/team/invitations/unknown/revoke").status_code == 404


def test_an_existing_user_accepts_with_their_password(
    login_as, org, other_org, make_user, app, mail_log
):
    existing = make_user("known@acme.io", org=other_org)
    admin = login_as(Role.ADMIN)
    post(admin, "/settings/team/invite", {"email": "known@acme.io", "role": "viewer"})
    link = invitation_link(mail_log)
    guest = app.test_client()
    token = csrf_token(guest, link)
    wrong = guest.post(link, data={"csrf_token": token, "password": "wrong password!"})
    assert wrong.status_code == 422
    assert guest.post(link, data={"csrf_token": token, "password": PASSWORD}).status_code == 303
    assert members(org)[existing.id] == Role.VIEWER


def test_invitations_go_through_the_system_mail_server(login_as, app, monkeypatch, redis):
    from rq import Queue

    from workers.worker import WhistleSimpleWorker

    with SmtpSink() as sink:
        monkeypatch.setitem(app.config, "WHISTLE_MAIL_URL", f"smtp://127.0.0.1:{sink.port}")
        monkeypatch.setitem(app.config, "WHISTLE_MAIL_FROM", "whistle@acme.io")
        admin = login_as(Role.ADMIN)
        response = post(admin, "/settings/team/invite", {"email": "c@acme.io", "role": "viewer"})
        assert response.status_code == 303
        queue = Queue("high", connection=redis)
        WhistleSimpleWorker([queue], connection=redis).work(burst=True)
        (message,) = sink.messages
        assert message["To"] == "c@acme.io" and message["From"] == "whistle@acme.io"
        assert "/settings/invitations/" in message.get_content()


# --- categories and topics ---------------------------------------------------------------------


def test_category_crud(login_as, org):
    client = login_as(Role.ADMIN)
    response = post(
        client,
        "/settings/categories",
        {
            "key": "billing",
            "name": "Billing",
            "default_channels": ["email", "sms"],
            "critical": "on",
        },
    )
    assert response.status_code == 303
    dup = post(client, "/settings/categories", {"key": "billing", "name": "Again"})
    assert dup.status_code == 422 and "already exists" in dup.get_data(as_text=True)
    bad = post(
        client, "/settings/categories", {"key": "bad key!", "name": "", "default_channels": ["fax"]}
    )
    assert bad.status_code == 422
    assert (
        post(
            client,
            "/settings/categories/billing",
            {"name": "Invoices", "default_channels": ["email"]},
        ).status_code
        == 303
    )
    with organization_scope(org.id):
        category = db.session.scalar(select(Category))
        assert (category.name, category.default_channels, category.critical) == (
            "Invoices",
            ["email"],
            False,
        )
    assert client.get("/settings/categories/billing").status_code == 200
    assert post(client, "/settings/categories/billing", {"name": ""}).status_code == 422
    assert post(client, "/settings/categories/billing/delete").status_code == 303
    assert client.get("/settings/categories/billing").status_code == 404


def test_topic_crud(login_as, org):
    client = login_as(Role.ADMIN)
    assert (
        post(client, "/settings/topics", {"key": "news", "name": "Newsletter"}).status_code == 303
    )
    assert post(client, "/settings/topics", {"key": "news", "name": "Again"}).status_code == 422
    assert post(client, "/settings/topics", {"key": "", "name": ""}).status_code == 422
    assert (
        post(client, "/settings/topics/news", {"name": "Monthly", "description": "d"}).status_code
        == 303
    )
    assert post(client, "/settings/topics/news", {"name": ""}).status_code == 422
    with organization_scope(org.id):
        assert db.session.scalar(select(Topic.name)) == "Monthly"
    assert post(client, "/settings/topics/news/delete").status_code == 303
    assert client.get("/settings/topics/news").status_code == 404


def test_foreign_categories_and_topics_are_404(login_as, other_org):
    with organization_scope(other_org.id):
        db.session.add_all(
            [Category(key="theirs", name="Theirs"), Topic(key="theirs", name="Theirs")]
        )
        db.session.flush()
    client = login_as(Role.OWNER)
    for kind in ("categories", "topics"):
        assert client.get(f"/settings/{kind}/theirs").status_code == 404
        assert post(client, f"/settings/{kind}/theirs", {"name": "x"}).status_code == 404
        assert post(client, f"/settings/{kind}/theirs/delete").status_code == 404


# --- organization --------------------------------------------------------------------------------


def test_organization_settings_are_saved_and_validated(login_as, org):
    client = login_as(Role.ADMIN)
    response = post(
        client,
        "/settings/organization",
        {
            "name": "Acme Inc",
            "from_name": "Acme",
            "from_email": "Hello@Acme.io",
            "allowed_origins": "https://App.Acme.io:443/\nhttp://localhost:3000",
        },
    )
    assert response.status_code == 303
    db.session.refresh(org)
    assert org.name == "Acme Inc"
    assert org.settings["sender"] == {"from_name": "Acme", "from_email": "hello@acme.io"}
    assert org.allowed_origins == ["https://app.acme.io", "http://localhost:3000"]
    bad = post(
        client,
        "/settings/organization",
        {"name": "", "from_email": "nope", "allowed_origins": "ftp://x\nhttps://ok.test/path"},
    )
    html = bad.get_data(as_text=True)
    assert bad.status_code == 422 and "ftp://x" in html and "https://ok.test/path" in html
    db.session.refresh(org)
    assert org.name == "Acme Inc"


def test_rotating_the_widget_secret_invalidates_old_tokens(login_as, org):
    client = login_as(Role.ADMIN)
    with organization_scope(org.id):
        token, _ = issue_recipient_token(org.id, "user-1")
    assert verify_recipient_token(token).external_id == "user-1"
    refused = post(client, "/settings/organization/widget-secret", {"confirm": "no"})
    assert refused.status_code == 422
    response = post(client, "/settings/organization/widget-secret", {"confirm": "rotate"})
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    assert 'id="new-secret"' in response.get_data(as_text=True)
    with pytest.raises(Exception, match=r"(?i)token|signature"):
        verify_recipient_token(token)
    with organization_scope(org.id):
        entry = db.session.scalar(
            select(AuditLog).where(AuditLog.action.like("organization.widget%"))
        )
    assert entry is not None


def test_organization_page_is_scoped(login_as, other_org):
    client = login_as(Role.OWNER)
    post(client, "/settings/organization", {"name": "Mine"})
    assert (
        db.session.scalar(
            unscoped(select(Organization.name).where(Organization.id == other_org.id))
        )
        == "Globex"
    )
