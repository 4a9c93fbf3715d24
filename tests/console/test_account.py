"""The console shell's account features: sign-in limits, session expiry, password reset by
mail, password change, the organization switcher, and HTTPS behind a proxy."""

from __future__ import annotations

import logging
import re
import time

import pytest

from tests.console.conftest import csrf_token, sign_in
from tests.factories import PASSWORD, SYSTEM
from tests.pipeline.conftest import run_jobs
from tests.smtp_sink import SmtpSink
from whistle_web import create_app
from whistle_web.accounts.models import Role
from whistle_web.accounts.services import add_member, password_reset_token
from whistle_web.config import ConfigError, load_config
from whistle_web.extensions import db
from whistle_web.system_mail import MailConfigError, MailServer, parse_mail_url
from whistle_web.tenancy import organization_scope

NEW_PASSWORD = "a brand new passphrase"
LINK = re.compile(r"https?://\S+/password/reset/[\w.\-]+")


@pytest.fixture(autouse=True)
def _fresh(redis, monkeypatch):  # type: ignore[no-untyped-def]
    """Fresh sign-in budgets (they live in Redis) and the mail log visible: running the
    migrations (Alembic's logging setup) disabled the loggers that existed then."""
    monkeypatch.setattr(logging.getLogger("whistle_web.system_mail"), "disabled", False)


@pytest.fixture
def user(org, make_user):  # type: ignore[no-untyped-def]
    return make_user("ada@example.com", org=org, role=Role.EDITOR)


def _client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


# --- sign-in rate limit -----------------------------------------------------------------


def test_failed_sign_ins_are_limited_per_email(app, user):
    for i in range(10):
        client = _client(app)
        response = sign_in(client, "ada@example.com", "wrong", environ_base={})
        assert response.status_code == 401, i
    # The right password from a new address is refused too while the email's budget is spent.
    client = _client(app)
    client.environ_base["REMOTE_ADDR"] = "203.0.113.9"
    response = sign_in(client, "ada@example.com", PASSWORD)
    assert response.status_code == 429
    page = response.get_data(as_text=True)
    assert "Too many failed sign-ins" in page and "incorrect" not in page
    assert client.get("/").status_code == 302


def test_failed_sign_ins_are_limited_per_address(app, user, make_user, org):
    other = make_user("bob@example.com", org=org)
    client = _client(app)
    for i in range(10):
        assert sign_in(client, f"nobody{i}@example.com", "guess").status_code == 401
    assert sign_in(client, other.email, PASSWORD).status_code == 429
    elsewhere = _client(app)
    elsewhere.environ_base["REMOTE_ADDR"] = "198.51.100.7"
    assert sign_in(elsewhere, other.email, PASSWORD).status_code == 302


def test_successful_sign_ins_do_not_count(app, user):
    for _ in range(12):
        client = _client(app)
        assert sign_in(client, "ada@example.com", PASSWORD).status_code == 302


# --- sessions ---------------------------------------------------------------------------


def test_the_session_is_permanent(app, user):
    client = _client(app)
    response = sign_in(client, "ada@example.com", PASSWORD)
    cookie = response.headers["Set-Cookie"]
    assert "Expires=" in cookie and "HttpOnly" in cookie


@pytest.mark.parametrize(
    ("key", "age", "message"),
    [
        ("seen", 61 * 60, "without activity"),
        ("since", 13 * 3600, "Your session expired."),
        ("pw", None, "Your password was changed."),
    ],
)
def test_an_expired_session_signs_out_with_a_message(app, user, key, age, message):
    client = _client(app)
    sign_in(client, "ada@example.com", PASSWORD)
    assert client.get("/").status_code == 200
    with client.session_transaction() as session:
        session[key] = time.time() - age if age else "stale"
    response = client.get("/recipients?q=x")
    assert response.status_code == 303
    assert response.headers["Location"].startswith("/login?next=/recipients")
    assert message in client.get("/login").get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_an_expired_session_redirects_htmx_requests(app, user):
    client = _client(app)
    sign_in(client, "ada@example.com", PASSWORD)
    with client.session_transaction() as session:
        session["seen"] = 0
    response = client.get("/recipients", headers={"HX-Request": "true"})
    assert response.status_code == 204 and response.headers["HX-Redirect"].startswith("/login")


# --- password reset ---------------------------------------------------------------------


def _forgot(client, email):  # type: ignore[no-untyped-def]
    return client.post(
        "/password/forgot",
        data={"email": email, "csrf_token": csrf_token(client, "/password/forgot")},
    )


def test_login_page_links_to_the_reset(client):
    assert "/password/forgot" in client.get("/login").get_data(as_text=True)


def test_the_same_answer_for_known_and_unknown_addresses(app, user, caplog):
    caplog.set_level(logging.INFO, "whistle_web.system_mail")
    answers = []
    for email in ("ada@example.com", "nobody@example.com"):
        client = _client(app)
        response = _forgot(client, email)
        assert response.status_code == 303 and response.headers["Location"] == "/login"
        page = client.get("/login").get_data(as_text=True)
        answers.append(page.replace(csrf_token(client), ""))
    assert answers[0] == answers[1] and "If an account uses that address" in answers[0]
    # Without WHISTLE_MAIL_URL the link is logged (development), only for the real account.
    links = LINK.findall(caplog.text)
    assert len(links) == 1 and links[0].startswith("http://127.0.0.1:5000/password/reset/")
    assert PASSWORD not in caplog.text


def test_invalid_forgot_form_is_422(client):
    response = client.post(
        "/password/forgot",
        data={"email": "nope", "csrf_token": csrf_token(client, "/password/forgot")},
    )
    assert response.status_code == 422 and "Invalid email address." in response.get_data(
        as_text=True
    )


def test_reset_by_mail_through_smtp(app, user, redis, monkeypatch):
    with SmtpSink() as sink:
        monkeypatch.setitem(app.config, "WHISTLE_MAIL_URL", f"smtp://127.0.0.1:{sink.port}")
        monkeypatch.setitem(app.config, "WHISTLE_MAIL_FROM", "Whistle <whistle@example.com>")
        client = _client(app)
        response = _forgot(client, "Ada@Example.com")
        assert response.status_code == 303
        assert not sink.messages  # sent by a job, not by the request
        run_jobs(redis)
    (message,) = sink.messages
    assert message["To"] == "ada@example.com"
    assert message["From"] == "Whistle <whistle@example.com>"
    assert message["Subject"] == "Reset your Whistle password"
    body = message.get_content()
    # The link is on WHISTLE_BASE_URL, not on the Host the request named (whistle.test).
    assert "whistle.test" not in body and PASSWORD not in body
    link = LINK.search(body).group(0)
    path = link.split("127.0.0.1:5000", 1)[1]

    client = _client(app)
    page = client.get(path)
    assert page.status_code == 200 and "ada@example.com" in page.get_data(as_text=True)
    token = csrf_token(client, path)
    mismatch = client.post(
        path, data={"password": NEW_PASSWORD, "confirm": "other", "csrf_token": token}
    )
    assert mismatch.status_code == 422 and "The passwords differ." in mismatch.get_data(
        as_text=True
    )
    short = client.post(path, data={"password": "short", "confirm": "short", "csrf_token": token})
    assert short.status_code == 422 and "at least 10 characters" in short.get_data(as_text=True)
    done = client.post(
        path, data={"password": NEW_PASSWORD, "confirm": NEW_PASSWORD, "csrf_token": token}
    )
    assert done.status_code == 303 and done.headers["Location"] == "/login"
    assert "Your password is changed" in client.get("/login").get_data(as_text=True)

    # The link is spent: the password it was issued for changed.
    assert client.get(path).status_code == 400
    reuse = client.post(path, data={"password": "x" * 12, "confirm": "x" * 12, "csrf_token": token})
    assert reuse.status_code == 400
    assert sign_in(_client(app), "ada@example.com", PASSWORD).status_code == 401
    assert sign_in(_client(app), "ada@example.com", NEW_PASSWORD).status_code == 302


def test_tampered_expired_and_foreign_tokens_are_refused(app, user, monkeypatch):
    token = password_reset_token(user, app.config["SECRET_KEY"])
    client = _client(app)
    assert client.get(f"/password/reset/{token}").status_code == 200
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert client.get(f"/password/reset/{tampered}").status_code == 400
    # Signed with the same key for another purpose (another salt): refused.
    from itsdangerous import URLSafeTimedSerializer

    other = URLSafeTimedSerializer(app.config["SECRET_KEY"], salt="something-else").dumps(
        {"user": user.id, "password": "x"}
    )
    assert client.get(f"/password/reset/{other}").status_code == 400
    assert client.get("/password/reset/garbage").status_code == 400
    # An hour later the link has expired.
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3601)
    response = client.get(f"/password/reset/{token}")
    monkeypatch.setattr(time, "time", real)
    assert response.status_code == 400
    assert "expired or was already used" in response.get_data(as_text=True)


def test_reset_requests_are_limited_quietly(app, user, caplog):
    caplog.set_level(logging.INFO, "whistle_web.system_mail")
    for _ in range(12):
        response = _forgot(_client(app), "ada@example.com")
        assert response.status_code == 303
    assert len(LINK.findall(caplog.text)) == 10


def test_mail_urls():
    assert parse_mail_url("smtp+starttls://me%40x.com:p%3Ass@mail.example.com") == MailServer(
        "mail.example.com", 587, "starttls", "me@x.com", "p:ss"
    )
    assert parse_mail_url("smtps://mail.example.com").port == 465
    assert parse_mail_url("smtp://127.0.0.1:2525").security == "plain"
    with pytest.raises(MailConfigError):
        parse_mail_url("http://mail.example.com")
    assert load_config({"WHISTLE_MAIL_URL": " smtps://h "})["WHISTLE_MAIL_URL"] == "smtps://h"
    with pytest.raises(ConfigError, match="WHISTLE_MAIL_URL"):
        load_config({"WHISTLE_MAIL_URL": "mail.example.com:25"})


# --- account page -----------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_account_page(login_as, role):
    client = login_as(role)
    page = client.get("/account").get_data(as_text=True)
    assert "Change your password" in page and f">{role}<" in page


def test_account_page_requires_sign_in(client):
    assert "/login" in client.get("/account").headers["Location"]


def _change(client, current, new, confirm=None):  # type: ignore[no-untyped-def]
    return client.post(
        "/account/password",
        data={
            "current_password": current,
            "new_password": new,
            "confirm": new if confirm is None else confirm,
            "csrf_token": client.csrf,
        },
    )


def test_change_password(app, login_as):
    client = login_as(Role.VIEWER)
    other_session = _client(app)
    assert sign_in(other_session, client.user.email, PASSWORD).status_code == 302
    for current, new, confirm, message in (
        ("wrong password", NEW_PASSWORD, None, "This is not your current password."),
        (PASSWORD, "short", None, "at least 10 characters"),
        (PASSWORD, NEW_PASSWORD, "different", "The passwords differ."),
        (PASSWORD, client.user.email, None, "Don&#39;t use your email address"),
    ):
        response = _change(client, current, new, confirm)
        assert response.status_code == 422
        assert message in response.get_data(as_text=True)
    response = _change(client, PASSWORD, NEW_PASSWORD)
    assert response.status_code == 303
    assert "Your password is changed." in client.get("/account").get_data(as_text=True)
    # This session goes on; the other one ends.
    assert client.get("/").status_code == 200
    assert other_session.get("/").status_code == 303


def test_change_password_needs_csrf(login_as):
    client = login_as(Role.OWNER)
    response = client.post(
        "/account/password",
        data={"current_password": PASSWORD, "new_password": NEW_PASSWORD, "confirm": NEW_PASSWORD},
    )
    assert response.status_code == 303 and response.headers["Location"] == "/account/password"
    assert sign_in(_client(client.application), client.user.email, PASSWORD).status_code == 302


# --- organization switcher ---------------------------------------------------------------


@pytest.fixture
def member_of_two(login_as, org, other_org, make_org):  # type: ignore[no-untyped-def]
    client = login_as(Role.VIEWER)
    with organization_scope(other_org.id):
        add_member(client.user, Role.ADMIN, actor=SYSTEM)
    db.session.flush()
    return client


def test_switcher_shows_only_with_several_organizations(login_as, member_of_two):
    single = login_as(Role.OWNER)
    assert 'name="organization_id"' not in single.get("/").get_data(as_text=True)
    page = member_of_two.get("/").get_data(as_text=True)
    assert 'name="organization_id"' in page and "Globex" in page and "Acme" in page


def test_switch_organization(member_of_two, other_org, make_org):
    client = member_of_two
    assert "<h1>Acme</h1>" in client.get("/").get_data(as_text=True)
    response = client.post(
        "/account/organization", data={"organization_id": other_org.id, "csrf_token": client.csrf}
    )
    assert response.status_code == 303 and response.headers["Location"] == "/"
    assert "<h1>Globex</h1>" in client.get("/").get_data(as_text=True)


def test_switch_to_a_foreign_organization_is_404(member_of_two, make_org):
    client = member_of_two
    stranger = make_org("Initech")
    for value in (stranger.id, "abc", ""):
        response = client.post(
            "/account/organization", data={"organization_id": value, "csrf_token": client.csrf}
        )
        assert response.status_code == 404
    assert "<h1>Acme</h1>" in client.get("/").get_data(as_text=True)


def test_switch_needs_csrf(member_of_two, other_org):
    response = member_of_two.post("/account/organization", data={"organization_id": other_org.id})
    assert response.status_code == 303
    assert "<h1>Acme</h1>" in member_of_two.get("/").get_data(as_text=True)


# --- HTTPS behind a proxy ----------------------------------------------------------------


def test_proxy_fix_defaults():
    base = {"SECRET_KEY": "x" * 40, "DATABASE_URL": "postgres://db/x", "REDIS_URL": "redis://r"}
    assert load_config({**base, "WHISTLE_ENV": "production"})["WHISTLE_PROXY_FIX"] == 1
    assert load_config({"WHISTLE_ENV": "development"})["WHISTLE_PROXY_FIX"] == 0
    assert load_config({"WHISTLE_PROXY_FIX": "2"})["WHISTLE_PROXY_FIX"] == 2


def test_hsts_only_over_https_behind_the_router(app):
    proxied = create_app({**app.config, "WHISTLE_PROXY_FIX": 1})
    client = proxied.test_client()
    plain = client.get("/login", headers={"X-Forwarded-Proto": "http"})
    assert "Strict-Transport-Security" not in plain.headers
    secure = client.get("/login", headers={"X-Forwarded-Proto": "https"})
    assert secure.headers["Strict-Transport-Security"].startswith("max-age=")
    # Without ProxyFix the header is a client's claim and changes nothing.
    direct = app.test_client().get("/login", headers={"X-Forwarded-Proto": "https"})
    assert "Strict-Transport-Security" not in direct.headers
