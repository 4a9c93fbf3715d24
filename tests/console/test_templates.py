"""Templates in the console: list, editor, live preview, versions, test send, layout."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from tests.factories import SYSTEM
from tests.smtp_sink import SmtpSink
from whistle_web.accounts.models import Role
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.extensions import db
from whistle_web.message_templates.services import update_email_layout
from whistle_web.models import (
    AuditLog,
    Category,
    Organization,
    Provider,
    Template,
    TemplateVersion,
)
from whistle_web.tenancy import organization_scope

CONTENT = {
    "email": {
        "subject": "Hello {{ recipient.name }}",
        "html": "<p>Hi {{ recipient.name }}, {{ data.reason }}</p>",
        "text": "Hi {{ recipient.name }}",
    },
    "sms": {"text": "Code {{ data.code }}"},
}
HX = {"HX-Request": "true"}


def form(client, **fields):
    """The editor's fields as the browser posts them (every channel's field, even empty)."""
    data = {
        "csrf_token": client.csrf,
        "name": "Welcome",
        "description": "",
        "category": "",
        "preview_data": "{}",
        "preview_recipient": "",
        "email_subject": "",
        "email_html": "",
        "email_text": "",
        "sms_text": "",
        "push_title": "",
        "push_body": "",
        "in_app_title": "",
        "in_app_body": "",
        "in_app_action_url": "",
    }
    data.update(fields)
    return data


def versions_of(org, template_id):
    with organization_scope(org.id):
        db.session.expire_all()
        return [
            (v.version, str(v.state), v.content)
            for v in db.session.scalars(
                select(TemplateVersion)
                .where(TemplateVersion.template_id == template_id)
                .order_by(TemplateVersion.version)
            )
        ]


def error_slot(html: str, name: str) -> str:
    match = re.search(rf'<div class="field-error" id="error-{name}"[^>]*>(.*?)</div>', html, re.S)
    assert match, f"no error slot for {name}"
    return match.group(1)


def frame_url(html: str) -> str:
    match = re.search(r'<iframe[^>]*src="(/templates/preview/[^"]+)"', html)
    assert match, "no preview frame"
    return match.group(1)


@pytest.fixture
def template(org, make_template):
    return make_template(org, "welcome", CONTENT)


@pytest.fixture
def sink():
    with SmtpSink() as sink:
        yield sink


def smtp_provider(org, port):
    with organization_scope(org.id):
        provider = Provider(
            channel=Channel.EMAIL,
            kind=ProviderKind.SMTP,
            name="SMTP",
            priority=10,
            settings={
                "host": "127.0.0.1",
                "port": port,
                "use_tls": "none",
                "from_email": "hi@acme.example.com",
            },
        )
        provider.set_credentials({})
        db.session.add(provider)
        db.session.flush()
    return provider


# --- roles -------------------------------------------------------------------------------

VIEW, EDIT, MANAGE = Role.VIEWER, Role.EDITOR, Role.ADMIN
RANK = {Role.VIEWER: 0, Role.EDITOR: 1, Role.ADMIN: 2, Role.OWNER: 3}


def routes(template_id):
    """(method, path, least role) for every route of the section."""
    t = template_id
    return [
        ("GET", "/templates", VIEW),
        ("GET", "/templates/new", EDIT),
        ("POST", "/templates/new", EDIT),
        ("GET", f"/templates/{t}", VIEW),
        ("POST", f"/templates/{t}", EDIT),
        ("POST", f"/templates/{t}/publish", EDIT),
        ("POST", "/templates/preview", VIEW),
        ("GET", "/templates/recipients?q=a", VIEW),
        ("POST", f"/templates/{t}/test", EDIT),
        ("GET", f"/templates/{t}/versions", VIEW),
        ("GET", f"/templates/{t}/versions/1", VIEW),
        ("POST", f"/templates/{t}/versions/1/rollback", EDIT),
        ("POST", f"/templates/{t}/delete", EDIT),
        ("GET", "/templates/layout", MANAGE),
        ("POST", "/templates/layout", MANAGE),
        ("POST", "/templates/layout/preview", MANAGE),
    ]


@pytest.mark.parametrize("role", [Role.VIEWER, Role.EDITOR, Role.ADMIN])
def test_each_route_allows_exactly_its_roles(login_as, template, role):
    client = login_as(role)
    for method, path, least in routes(template.id):
        response = client.open(path, method=method, data=form(client, name=""))
        if RANK[role] >= RANK[least]:
            assert response.status_code not in (401, 403), (role, method, path)
        else:
            assert response.status_code == 403, (role, method, path)


def test_anonymous_people_are_sent_to_sign_in(client, template):
    response = client.get("/templates")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_posts_without_the_csrf_token_are_refused(login_as, template, org):
    client = login_as(Role.EDITOR)
    fields = form(client, **{"email_subject": "Changed", "email_text": "x"})
    del fields["csrf_token"]
    response = client.post(f"/templates/{template.id}", data=fields)
    assert response.status_code == 303  # back to the form with "The form expired"
    assert len(versions_of(org, template.id)) == 1
    assert client.post("/templates/preview", data=fields, headers=HX).status_code == 400
    assert client.post(f"/templates/{template.id}/test", data=fields, headers=HX).status_code == 400


def test_foreign_ids_are_404(login_as, other_org, make_template):
    foreign = make_template(other_org, "theirs", CONTENT)
    client = login_as(Role.OWNER)
    for method, path, _ in routes(foreign.id):
        if "/layout" in path or path in ("/templates", "/templates/new") or "?" in path:
            continue
        if path == "/templates/preview":
            response = client.post(path, data=form(client, template_id=str(foreign.id)))
        else:
            response = client.open(path, method=method, data=form(client))
        assert response.status_code == 404, (method, path)
    assert len(versions_of(other_org, foreign.id)) == 1


# --- the list ----------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.VIEWER, Role.EDITOR])
def test_the_empty_list_says_how_to_start(login_as, role):
    page = login_as(role).get("/templates").get_data(as_text=True)
    assert "No templates yet" in page
    assert ('href="/templates/new"' in page) is (role == Role.EDITOR)
    assert '<a href="/templates" aria-current="page">Templates</a>' in page


def test_the_list_shows_each_template(login_as, org, template):
    with organization_scope(org.id):
        category = Category(key="billing", name="Billing")
        db.session.add(category)
        db.session.flush()
        template.category_id = category.id
        db.session.flush()
    client = login_as(Role.VIEWER)
    page = client.get("/templates").get_data(as_text=True)
    assert "<code>welcome</code>" in page and "Billing" in page
    assert ">email</span>" in page and ">sms</span>" in page and "v1" in page
    assert "UTC" in page  # last edited
    fragment = client.get("/templates?q=nomatch", headers=HX).get_data(as_text=True)
    assert fragment.startswith('<div id="template-table">') and "<html" not in fragment
    assert "No template matches" in fragment


# --- create and edit ---------------------------------------------------------------------


def test_create_a_template(login_as, org):
    client = login_as(Role.EDITOR)
    response = client.post(
        "/templates/new",
        data=form(client, key="order-shipped", sms_text="Shipped {{ data.order }}"),
    )
    assert response.status_code == 303
    with organization_scope(org.id):
        template = db.session.scalar(select(Template).where(Template.key == "order-shipped"))
    assert response.headers["Location"].endswith(f"/templates/{template.id}")
    assert versions_of(org, template.id) == [
        (1, "draft", {"sms": {"text": "Shipped {{ data.order }}"}})
    ]
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "created as a draft" in page and "draft v1" in page


@pytest.mark.parametrize(
    ("fields", "slot", "message"),
    [
        ({"key": "bad key!"}, "key", "Letters, digits"),
        ({"name": ""}, "name", "Give the template a name"),
        ({"sms_text": ""}, "channels", "at least one channel"),
        ({"email_html": "<p>x</p>"}, "email_subject", "Subject is required"),
        ({"email_subject": "Hi"}, "email_html", "needs HTML or text"),
        ({"push_title": "Only a title"}, "push_body", "Body is required"),
        ({"category": "nope"}, "category", "Choose a category"),
    ],
)
def test_invalid_input_re_renders_with_422_and_saves_nothing(login_as, org, fields, slot, message):
    client = login_as(Role.EDITOR)
    data = form(client, key="fresh", sms_text="Hi")
    data.update(fields)
    response = client.post("/templates/new", data=data)
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert message in error_slot(page, slot)
    assert 'value="fresh"' in page or fields.get("key")  # what was typed stays
    with organization_scope(org.id):
        assert db.session.scalar(select(Template).where(Template.key == "fresh")) is None


def test_a_taken_key_is_a_field_error(login_as, template):
    client = login_as(Role.EDITOR)
    response = client.post("/templates/new", data=form(client, key="welcome", sms_text="x"))
    assert response.status_code == 422
    assert "already exists" in error_slot(response.get_data(as_text=True), "key")


def test_the_editor_shows_the_latest_content_read_only_for_viewers(login_as, template):
    viewer = login_as(Role.VIEWER).get(f"/templates/{template.id}").get_data(as_text=True)
    assert "Code {{ data.code }}" in viewer
    assert "readonly" in viewer and "Save draft" not in viewer and "Save and publish" not in viewer
    assert "Send a test email" not in viewer


def test_the_editor_offers_saving_publishing_and_a_test_send_to_editors(login_as, template):
    editor = login_as(Role.EDITOR).get(f"/templates/{template.id}").get_data(as_text=True)
    assert "Save draft" in editor and "Save and publish" in editor and "Send a test email" in editor
    # No inline script or style: the CSP forbids them.
    assert "<script>" not in editor and "style=" not in editor
    assert re.findall(r"<script[^>]*>", editor)[0] == (
        '<script src="/static/js/templates.js" defer>'
    )


def test_saves_update_one_draft_until_it_is_published(login_as, org, template):
    client = login_as(Role.EDITOR)
    url = f"/templates/{template.id}"
    first = client.post(url, data=form(client, sms_text="Code one {{ data.code }}"))
    assert first.status_code == 303
    client.post(url, data=form(client, sms_text="Code two {{ data.code }}", name="Renamed"))
    versions = versions_of(org, template.id)
    assert [(n, s) for n, s, _ in versions] == [(1, "published"), (2, "draft")]
    assert versions[1][2] == {"sms": {"text": "Code two {{ data.code }}"}}
    with organization_scope(org.id):
        assert db.session.get(Template, template.id).name == "Renamed"
    published = client.post(
        f"{url}/publish", data=form(client, sms_text="Code two {{ data.code }}", name="Renamed")
    )
    assert published.status_code == 303
    assert [(n, s) for n, s, _ in versions_of(org, template.id)] == [
        (1, "archived"),
        (2, "published"),
    ]
    client.post(url, data=form(client, sms_text="Code three", name="Renamed"))
    assert [(n, s) for n, s, _ in versions_of(org, template.id)][-1] == (3, "draft")
    with organization_scope(org.id):
        actions = db.session.scalars(select(AuditLog.action).order_by(AuditLog.id)).all()
    assert "template.published" in actions and "template.updated" in actions


def test_publishing_unchanged_content_says_so(login_as, org, template):
    client = login_as(Role.EDITOR)
    response = client.post(
        f"/templates/{template.id}/publish",
        data=form(client, name="Template", **_fields(CONTENT)),
        follow_redirects=True,
    )
    assert "Nothing new to publish" in response.get_data(as_text=True)
    assert len(versions_of(org, template.id)) == 1


def _fields(content):
    return {
        "email_subject": content["email"]["subject"],
        "email_html": content["email"]["html"],
        "email_text": content["email"]["text"],
        "sms_text": content["sms"]["text"],
    }


def test_publish_refuses_unknown_variables_and_syntax_errors_inline(login_as, org, template):
    client = login_as(Role.EDITOR)
    response = client.post(
        f"/templates/{template.id}/publish",
        data=form(
            client,
            email_subject="Hi {{ user.name }}",
            email_text="ok",
            sms_text="line one\n{{ data.code ",
        ),
    )
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert "Line 1: unknown variable &#39;user&#39;" in error_slot(page, "email_subject")
    assert "Line 2" in error_slot(page, "sms_text")
    # The draft is kept (nothing is lost), the published version is unchanged.
    assert [(n, s) for n, s, _ in versions_of(org, template.id)] == [
        (1, "published"),
        (2, "draft"),
    ]


# --- live preview ------------------------------------------------------------------------


def test_the_preview_renders_as_a_send_would(login_as, org, template):
    client = login_as(Role.VIEWER)
    data = form(
        client,
        template_id=str(template.id),
        preview_data='{"code": "1234", "reason": "welcome"}',
        **{"email_subject": "Hello {{ recipient.name }} at {{ organization.name }}"},
        sms_text="Code {{ data.code }} {{ unsubscribe_url }}",
        push_body="Push {{ data.code }}",
        in_app_body="Inbox {{ recipient.email }}",
        in_app_action_url="https://example.com/{{ data.code }}",
        email_html="<p>{{ data.reason }}</p>",
    )
    response = client.post("/templates/preview", data=data, headers=HX)
    assert response.status_code == 200
    fragment = response.get_data(as_text=True)
    assert "<html" not in fragment and "<form" not in fragment
    assert "Hello Ada Lovelace at Acme" in fragment
    assert "Code 1234 http://" in fragment and "/t/u/preview" in fragment
    assert "Push 1234" in fragment and "Inbox ada@example.com" in fragment
    assert "https://example.com/1234" in fragment
    assert 'hx-swap-oob="true"' in fragment  # the error slots follow
    frame = client.get(frame_url(fragment))
    assert frame.status_code == 200 and "<p>welcome</p>" in frame.get_data(as_text=True)
    full = client.post("/templates/preview", data=data)
    assert full.status_code == 200 and "<!doctype html>" in full.get_data(as_text=True)


def test_preview_flags_problems_per_field_as_you_type(login_as):
    client = login_as(Role.EDITOR)
    fragment = client.post(
        "/templates/preview",
        data=form(
            client,
            email_subject="{{ nope }}",
            email_text="fine",
            sms_text="a\nb {% if %}",
            push_body="{{ data.x }} {{ recipient.name }}",
            preview_data="{not json",
        ),
        headers=HX,
    ).get_data(as_text=True)
    assert "unknown variable &#39;nope&#39;" in error_slot(fragment, "email_subject")
    assert "Line 2" in error_slot(fragment, "sms_text")
    assert error_slot(fragment, "push_body") == ""
    assert "Not valid JSON" in error_slot(fragment, "preview_data")
    # Fixing the field clears its message (the slot comes back empty).
    fixed = client.post(
        "/templates/preview", data=form(client, sms_text="ok"), headers=HX
    ).get_data(as_text=True)
    assert error_slot(fixed, "sms_text") == "" and error_slot(fixed, "email_subject") == ""


def test_preview_with_a_real_recipient_of_the_organization(
    login_as, org, other_org, make_recipient
):
    make_recipient(org, "u-1", email="grace@example.com", name="Grace", attributes={"plan": "pro"})
    make_recipient(other_org, "u-2", email="gretel@example.com", name="Gretel")
    client = login_as(Role.VIEWER)
    found = client.get("/templates/recipients?q=gr", headers=HX).get_data(as_text=True)
    assert 'data-pick-recipient="u-1"' in found and "u-2" not in found
    assert "u-1" in client.get("/templates/recipients?q=U-", headers=HX).get_data(as_text=True)
    assert "No recipient" in client.get("/templates/recipients?q=zz").get_data(as_text=True)
    fields = form(client, sms_text="{{ recipient.name }} on {{ recipient.attributes.plan }}")
    fragment = client.post(
        "/templates/preview", data={**fields, "preview_recipient": "u-1"}, headers=HX
    ).get_data(as_text=True)
    assert "Grace on pro" in fragment
    foreign = client.post(
        "/templates/preview", data={**fields, "preview_recipient": "u-2"}, headers=HX
    ).get_data(as_text=True)
    assert "No recipient" in error_slot(foreign, "preview_recipient")
    assert "Gretel" not in foreign and "Ada Lovelace" in foreign


def test_preview_escapes_data_and_never_runs_template_html_in_the_console(login_as):
    client = login_as(Role.EDITOR)
    evil = "<script>alert(1)</script>"
    fragment = client.post(
        "/templates/preview",
        data=form(
            client,
            email_subject="{{ data.x }}",
            email_html="<p>{{ data.x }}</p><script>alert('template')</script>",
            sms_text="{{ data.x }}",
            in_app_body="{{ data.x }}",
            preview_data='{"x": "<script>alert(1)</script>"}',
        ),
        headers=HX,
    ).get_data(as_text=True)
    assert evil not in fragment and "<script" not in fragment
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in fragment
    assert re.search(r'<iframe[^>]*sandbox=""', fragment)
    frame = client.get(frame_url(fragment))
    body = frame.get_data(as_text=True)
    # The HTML field autoescapes data; the template's own markup is as written...
    assert "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>" in body
    # ...and its response forbids every script, in a sandbox, only framed by the console.
    csp = frame.headers["Content-Security-Policy"]
    assert csp.startswith("sandbox;") and "default-src 'none'" in csp
    assert "script-src" not in csp and "frame-ancestors 'self'" in csp
    assert frame.headers["X-Frame-Options"] == "SAMEORIGIN"


def test_a_preview_frame_belongs_to_its_member(login_as, app):
    one = login_as(Role.EDITOR)
    fragment = one.post(
        "/templates/preview", data=form(one, email_subject="s", email_html="<b>x</b>"), headers=HX
    ).get_data(as_text=True)
    url = frame_url(fragment)
    assert one.get(url).status_code == 200
    assert one.get("/templates/preview/not-a-token!").status_code == 404
    with app.app_context():  # a fresh request cache (``g``) for another member's client
        two = login_as(Role.EDITOR)
        assert two.get(url).status_code == 404


# --- versions ----------------------------------------------------------------------------


def test_versions_and_rollback(login_as, org, template):
    client = login_as(Role.EDITOR)
    url = f"/templates/{template.id}"
    client.post(f"{url}/publish", data=form(client, sms_text="Second"))
    page = client.get(f"{url}/versions").get_data(as_text=True)
    assert "v2" in page and "published" in page and "archived" in page
    assert "Publish again" in page
    fragment = client.get(f"{url}/versions", headers=HX).get_data(as_text=True)
    assert fragment.strip().startswith('<div id="template-versions">')
    one = client.get(f"{url}/versions/1").get_data(as_text=True)
    assert "Code {{ data.code }}" in one
    assert client.get(f"{url}/versions/9").status_code == 404
    response = client.post(f"{url}/versions/1/rollback", data={"csrf_token": client.csrf})
    assert response.status_code == 303
    versions = versions_of(org, template.id)
    assert [(n, s) for n, s, _ in versions] == [
        (1, "archived"),
        (2, "archived"),
        (3, "published"),
    ]
    assert versions[2][2] == CONTENT
    again = client.post(
        f"{url}/versions/3/rollback", data={"csrf_token": client.csrf}, follow_redirects=True
    )
    assert "is the published version already" in again.get_data(as_text=True)
    missing = client.post(f"{url}/versions/7/rollback", data={"csrf_token": client.csrf})
    assert missing.status_code == 404


def test_viewers_see_versions_without_rollback(login_as, template):
    page = login_as(Role.VIEWER).get(f"/templates/{template.id}/versions").get_data(as_text=True)
    assert "v1" in page and "Publish again" not in page


def test_delete_an_unpublished_template(login_as, org):
    client = login_as(Role.EDITOR)
    client.post("/templates/new", data=form(client, key="temp", sms_text="x"))
    with organization_scope(org.id):
        template = db.session.scalar(select(Template).where(Template.key == "temp"))
    response = client.post(f"/templates/{template.id}/delete", data={"csrf_token": client.csrf})
    assert response.status_code == 303 and response.headers["Location"].endswith("/templates")
    with organization_scope(org.id):
        assert db.session.get(Template, template.id) is None


# --- test send ---------------------------------------------------------------------------


def test_send_a_test_email_to_yourself(login_as, org, template, sink, app):
    smtp_provider(org, sink.port)
    client = login_as(Role.EDITOR)
    response = client.post(
        f"/templates/{template.id}/test",
        data=form(
            client,
            email_subject="Test for {{ recipient.name or recipient.email }}",
            email_html="<p>{{ data.reason }}</p>",
            preview_data='{"reason": "because"}',
        ),
        headers=HX,
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert f"Sent to {client.user.email}" in response.get_data(as_text=True)
    (message,) = sink.messages
    assert message["To"] == client.user.email
    assert message["Subject"] == f"Test for {client.user.email}"
    html = next(p for p in message.walk() if p.get_content_type() == "text/html").get_content()
    assert "<p>because</p>" in html
    with organization_scope(org.id):
        entry = db.session.scalar(select(AuditLog).where(AuditLog.action == "template.test_sent"))
        assert entry.changes["ok"] is True and entry.target_id == str(template.id)


def test_a_test_send_needs_an_email_provider_and_email_content(login_as, template, sink):
    client = login_as(Role.EDITOR)
    url = f"/templates/{template.id}/test"
    response = client.post(url, data=form(client, email_subject="s", email_text="t"), headers=HX)
    assert response.status_code == 409 and "Add an email provider" in response.get_data(
        as_text=True
    )
    no_email = client.post(url, data=form(client, sms_text="x"), headers=HX)
    assert no_email.status_code == 422 and "no email content" in no_email.get_data(as_text=True)
    plain = client.post(url, data=form(client, email_subject="s", email_text="t"))
    assert plain.status_code == 303  # without htmx: back to the editor with a message
    assert not sink.messages


# --- the email layout --------------------------------------------------------------------

LAYOUT = {
    "header_html": "<div class='brand'>{{ organization.name }} header</div>",
    "footer_html": "<a href='{{ unsubscribe_url }}'>Unsubscribe</a> {{ brand_color }}",
    "brand_color": "#FF8800",
}


def test_admins_edit_the_layout(login_as, org):
    client = login_as(Role.ADMIN)
    page = client.get("/templates/layout").get_data(as_text=True)
    assert "Brand colour" in page
    blank = client.get(frame_url(page)).get_data(as_text=True)
    assert "<h1>Hello Ada Lovelace</h1>" in blank and "whistle-header" not in blank
    response = client.post("/templates/layout", data={"csrf_token": client.csrf, **LAYOUT})
    assert response.status_code == 303
    with organization_scope(org.id):
        organization = db.session.get(Organization, org.id)
        db.session.refresh(organization)
        assert organization.settings["email_layout"] == {**LAYOUT, "brand_color": "#ff8800"}
    page = client.get("/templates/layout").get_data(as_text=True)
    frame = client.get(frame_url(page)).get_data(as_text=True)
    assert "Acme header" in frame and "border-top:4px solid #ff8800" in frame
    assert "/t/u/preview" in frame and "#ff8800" in frame


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("brand_color", "red; background:url(x)", "Use a colour like"),
        ("header_html", "{{ secret }}", "unknown variable"),
        ("footer_html", "{% for %}", "Line 1"),
    ],
)
def test_an_invalid_layout_is_not_saved(login_as, org, field, value, message):
    client = login_as(Role.ADMIN)
    response = client.post(
        "/templates/layout", data={"csrf_token": client.csrf, **LAYOUT, field: value}
    )
    assert response.status_code == 422
    assert message in error_slot(response.get_data(as_text=True), field)
    with organization_scope(org.id):
        assert "email_layout" not in (db.session.get(Organization, org.id).settings or {})
    fragment = client.post(
        "/templates/layout/preview",
        data={"csrf_token": client.csrf, **LAYOUT, field: value},
        headers=HX,
    ).get_data(as_text=True)
    assert "<html" not in fragment and message in error_slot(fragment, field)


def test_the_template_preview_shows_the_layout(login_as, org, template):
    with organization_scope(org.id):
        update_email_layout(**LAYOUT, actor=SYSTEM)
    client = login_as(Role.EDITOR)
    fragment = client.post(
        "/templates/preview",
        data=form(client, email_subject="s", email_html="<p>Body</p>"),
        headers=HX,
    ).get_data(as_text=True)
    frame = client.get(frame_url(fragment)).get_data(as_text=True)
    assert frame.index("Acme header") < frame.index("<p>Body</p>") < frame.index("Unsubscribe")


def test_ids_beyond_the_database_range_are_404(login_as, template):
    client = login_as(Role.EDITOR)
    huge = "9" * 25
    assert client.get(f"/templates/{huge}").status_code == 404
    assert client.get(f"/templates/{template.id}/versions/{huge}").status_code == 404
    assert client.get(f"/templates/{template.id}/versions/0").status_code == 404
    response = client.post("/templates/preview", data=form(client, template_id=huge))
    assert response.status_code == 404


def test_previews_of_one_open_editor_reuse_one_stored_frame(login_as, redis):
    client = login_as(Role.EDITOR)
    page = client.get("/templates/new").get_data(as_text=True)
    slot = re.search(r'name="preview_slot" value="([^"]+)"', page).group(1)
    urls = set()
    for word in ("one", "two", "three"):
        fields = form(client, email_subject="s", email_html=f"<p>{word}</p>", preview_slot=slot)
        fragment = client.post("/templates/preview", data=fields, headers=HX)
        urls.add(frame_url(fragment.get_data(as_text=True)))
    assert len(urls) == 3  # a new URL each time, so the iframe reloads...
    assert len(redis.keys("whistle:console:preview:*")) == 1  # ...one stored HTML
    assert "<p>three</p>" in client.get(urls.pop()).get_data(as_text=True)


def test_the_latest_draft_is_published_from_the_history_without_a_copy(login_as, org, template):
    client = login_as(Role.EDITOR)
    client.post(f"/templates/{template.id}", data=form(client, sms_text="Draft"))
    response = client.post(
        f"/templates/{template.id}/versions/2/rollback",
        data={"csrf_token": client.csrf},
        follow_redirects=True,
    )
    assert "Version 2 is published." in response.get_data(as_text=True)
    assert [(n, s) for n, s, _ in versions_of(org, template.id)] == [
        (1, "archived"),
        (2, "published"),
    ]
    broken = client.post(
        f"/templates/{template.id}/publish", data=form(client, sms_text="{{ nope }}")
    )
    assert broken.status_code == 422
    refused = client.post(
        f"/templates/{template.id}/versions/3/rollback",
        data={"csrf_token": client.csrf},
        follow_redirects=True,
    )
    assert "unknown variable" in refused.get_data(as_text=True)
    assert [(n, s) for n, s, _ in versions_of(org, template.id)][-1] == (3, "draft")
