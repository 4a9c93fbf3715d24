"""Console sign-in, sign-out and the dashboard through the test client."""

from __future__ import annotations

import pytest

from tests.console.conftest import csrf_token, sign_in
from tests.factories import PASSWORD
from whistle_web.demo import DEMO_EMAIL, DEMO_PASSWORD, seed_demo


def test_login_page_has_the_fields_and_a_csrf_token(client):
    response = client.get("/login")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert 'name="email"' in page and 'name="password"' in page
    assert csrf_token(client)


def test_dashboard_requires_sign_in(client):
    response = client.get("/")
    assert response.status_code == 302
    assert "/login" in response.headers["Location"]


def test_sign_in_with_the_demo_login_shows_the_dashboard(client):
    seed_demo()
    response = sign_in(client, DEMO_EMAIL, DEMO_PASSWORD)
    assert response.status_code == 302
    page = client.get("/").get_data(as_text=True)
    assert "Acme Cloud (demo)" in page
    assert "October product update" in page
    assert "Last 7 days" in page and "Clicked" in page
    for section in ("Dashboard",):
        assert section in page


@pytest.mark.parametrize(
    ("email", "password"),
    [("user@example.com", "wrong password"), ("nobody@example.com", PASSWORD)],
)
def test_bad_credentials_get_one_generic_message(client, org, make_user, email, password):
    make_user("user@example.com", org=org)
    response = sign_in(client, email, password)
    assert response.status_code == 401
    assert "Email or password is incorrect." in response.get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_invalid_form_rerenders_with_field_messages(client):
    response = client.post(
        "/login", data={"email": "not-an-email", "password": "", "csrf_token": csrf_token(client)}
    )
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert "Invalid email address." in page
    assert "This field is required." in page


def test_a_form_without_csrf_token_is_refused(client, org, make_user):
    make_user("user@example.com", org=org)
    response = client.post("/login", data={"email": "user@example.com", "password": PASSWORD})
    assert response.status_code == 303
    assert response.headers["Location"] == "/login"
    assert "The form expired" in client.get("/login").get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_next_is_followed_only_within_the_site(client, org, make_user):
    make_user("user@example.com", org=org)
    assert (
        sign_in(client, "user@example.com", PASSWORD, next="/?x=1").headers["Location"] == "/?x=1"
    )
    client.post("/logout", data={"csrf_token": csrf_token(client, "/")})
    for target in ("https://evil.example.com/", "//evil.example.com", "javascript:alert(1)"):
        location = sign_in(client, "user@example.com", PASSWORD, next=target).headers["Location"]
        assert "evil" not in location and "javascript" not in location
        client.post("/logout", data={"csrf_token": csrf_token(client, "/")})


def test_a_user_without_membership_cannot_sign_in(client, make_user):
    make_user("loner@example.com")
    assert sign_in(client, "loner@example.com", PASSWORD).status_code == 401


def test_sign_out(client, org, make_user):
    make_user("user@example.com", org=org)
    sign_in(client, "user@example.com", PASSWORD)
    assert client.get("/").status_code == 200
    response = client.post("/logout", data={"csrf_token": csrf_token(client, "/")})
    assert response.status_code == 302
    assert client.get("/").status_code == 302


def test_dashboard_shows_only_the_users_organization(client, org, other_org, make_user):
    make_user("user@example.com", org=org)
    other_org.name = "Globex Secret Projects"
    sign_in(client, "user@example.com", PASSWORD)
    page = client.get("/").get_data(as_text=True)
    assert "Acme" in page and "Globex" not in page
    assert "Nothing was sent in the last 7 days" in page


def test_security_headers(client):
    response = client.get("/login")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "Strict-Transport-Security" not in response.headers
    secure = client.get("/login", base_url="https://whistle.test")
    assert secure.headers["Strict-Transport-Security"].startswith("max-age=")


def test_session_cookie_is_httponly_and_samesite(client):
    response = client.get("/login")
    cookie = response.headers.get("Set-Cookie", "")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_unknown_pages_render_a_friendly_404(client):
    response = client.get("/no-such-page")
    assert response.status_code == 404
    assert "This page does not exist" in response.get_data(as_text=True)
