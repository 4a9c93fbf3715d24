"""The widget demo page: a recipient token for the signed-in staff's organization only."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from tests.console.conftest import csrf_token, sign_in
from tests.factories import PASSWORD
from whistle_web.extensions import db
from whistle_web.models import SendRequest, Template, TemplateVersion, VersionState
from whistle_web.preferences.services import verify_recipient_token
from whistle_web.tenancy import organization_scope


@pytest.fixture
def staff(client, org, make_user):
    make_user("staff@example.com", org=org)
    sign_in(client, "staff@example.com", PASSWORD)
    return org


def token_on(html: str) -> str:
    match = re.search(r'data-token="([^"]+)"', html)
    assert match, "no token on the page"
    return match.group(1)


def in_app_template(org, key="welcome"):
    with organization_scope(org.id):
        template = Template(key=key, name="Welcome")
        db.session.add(template)
        db.session.flush()
        version = TemplateVersion(
            template_id=template.id,
            version=1,
            state=VersionState.PUBLISHED,
            content={"in_app": {"title": "Hi", "body": "Welcome"}},
        )
        db.session.add(version)
        db.session.flush()
        template.published_version_id = version.id
        db.session.flush()
    return template


def test_the_demo_needs_a_signed_in_member(client):
    response = client.get("/widget/demo")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_the_demo_page_mounts_the_widget_for_the_first_recipient(
    client, staff, make_recipient, app
):
    first = make_recipient(staff, "first", name="First Person")
    make_recipient(staff, "second")
    in_app_template(staff)
    response = client.get("/widget/demo")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    claims = verify_recipient_token(token_on(html))
    assert (claims.organization_id, claims.external_id) == (staff.id, first.external_id)
    # The strict CSP holds: scripts are static files, nothing inline.
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert re.findall(r"<script[^>]*>", html) == [
        '<script src="/static/widget/whistle.js" defer>',
        '<script src="/static/js/widget-demo.js" defer>',
    ]
    assert "style=" not in html and "onclick" not in html
    assert 'option value="welcome"' in html
    # The console nav links the demo.
    assert 'href="/widget/demo"' in client.get("/").get_data(as_text=True)


def test_a_chosen_recipient_and_an_unknown_one(client, staff, make_recipient):
    make_recipient(staff, "first")
    make_recipient(staff, "chosen <one>")
    html = client.get("/widget/demo", query_string={"recipient": "chosen <one>"}).get_data(
        as_text=True
    )
    assert verify_recipient_token(token_on(html)).external_id == "chosen <one>"
    assert "chosen &lt;one&gt;" in html and "chosen <one>" not in html

    missing = client.get("/widget/demo", query_string={"recipient": "nobody"})
    assert missing.status_code == 404
    page = missing.get_data(as_text=True)
    assert "No recipient &#39;nobody&#39;" in page and "whistle-bell" not in page
    assert client.get("/widget/demo", query_string={"recipient": "x" * 5000}).status_code == 404


def test_an_organization_without_recipients_gets_a_message(client, staff):
    response = client.get("/widget/demo")
    assert response.status_code == 404
    assert "has no recipients yet" in response.get_data(as_text=True)


def test_recipients_of_another_organization_are_not_reachable(
    client, staff, other_org, make_recipient
):
    make_recipient(staff, "ours")
    make_recipient(other_org, "theirs")
    response = client.get("/widget/demo", query_string={"recipient": "theirs"})
    assert response.status_code == 404
    token = csrf_token(client, "/widget/demo")
    renewed = client.post(
        "/widget/demo/token", json={"recipient": "theirs"}, headers={"X-CSRFToken": token}
    )
    assert renewed.status_code == 404


def test_the_token_endpoint_renews_with_a_csrf_header(client, staff, make_recipient):
    make_recipient(staff, "ours")
    token = csrf_token(client, "/widget/demo")
    assert client.post("/widget/demo/token", json={"recipient": "ours"}).status_code in (
        302,
        303,
        400,
    )
    response = client.post(
        "/widget/demo/token", json={"recipient": "ours"}, headers={"X-CSRFToken": token}
    )
    assert response.status_code == 200
    claims = verify_recipient_token(response.get_json()["token"])
    assert (claims.organization_id, claims.external_id) == (staff.id, "ours")


def test_sending_a_test_notification(client, staff, make_recipient, redis):
    make_recipient(staff, "ours")
    in_app_template(staff)
    token = csrf_token(client, "/widget/demo")
    response = client.post(
        "/widget/demo/send",
        data={"csrf_token": token, "recipient": "ours", "template": "welcome"},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 202
    with organization_scope(staff.id):
        sent = db.session.scalars(select(SendRequest)).all()
    assert [s.channels for s in sent] == [["in_app"]]

    bad = client.post(
        "/widget/demo/send",
        data={"csrf_token": token, "recipient": "ours", "template": "nope"},
    )
    assert bad.status_code == 303
    page = client.get(bad.headers["Location"]).get_data(as_text=True)
    assert "Nothing was sent" in page and "No template with key &#39;nope&#39;" in page


def test_a_viewer_sees_the_demo_but_cannot_send(login_as, org, make_recipient):
    from whistle_web.accounts.models import Role

    make_recipient(org, "ours")
    in_app_template(org)
    viewer = login_as(Role.VIEWER)
    page = viewer.get("/widget/demo")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert verify_recipient_token(token_on(html)).external_id == "ours"
    assert "demo-send" not in html
    response = viewer.post(
        "/widget/demo/send",
        data={"csrf_token": viewer.csrf, "recipient": "ours", "template": "welcome"},
    )
    assert response.status_code == 403
    with organization_scope(org.id):
        assert db.session.scalars(select(SendRequest)).all() == []
