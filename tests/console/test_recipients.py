"""The Recipients section: search, profile, preferences, topics, CSV import and export."""

from __future__ import annotations

import csv
import io

import pytest
from sqlalchemy import select

from tests.factories import SYSTEM
from tests.pipeline.conftest import run_jobs
from whistle_web.accounts.models import Role
from whistle_web.audiences.services import create_segment, create_topic, subscribe
from whistle_web.extensions import db
from whistle_web.models import AuditLog, Category, Preference, Recipient
from whistle_web.tenancy import organization_scope

HX = {"HX-Request": "true"}


@pytest.fixture
def people(org, make_recipient):  # type: ignore[no-untyped-def]
    ada = make_recipient(
        org,
        "u-ada",
        email="ada@example.com",
        name="Ada Lovelace",
        phone="+14155550100",
        attributes={"plan": "pro", "seats": 5},
    )
    bob = make_recipient(
        org, "u-bob", email="bob@example.com", name="Bob", attributes={"plan": "free"}
    )
    return ada, bob


@pytest.fixture
def foreign(other_org, make_recipient):  # type: ignore[no-untyped-def]
    return make_recipient(other_org, "u-foreign", email="spy@globex.example", name="Foreign")


def _post(client, url, data=None, **kwargs):  # type: ignore[no-untyped-def]
    return client.post(url, data={"csrf_token": client.csrf, **(data or {})}, **kwargs)


# --- list -------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_every_role_sees_the_list(login_as, people, role):
    page = login_as(role).get("/recipients").get_data(as_text=True)
    assert "u-ada" in page and "u-bob" in page
    assert ("Import CSV" in page) == (role != Role.VIEWER)


def test_anonymous_is_sent_to_sign_in(client):
    assert "/login" in client.get("/recipients").headers["Location"]


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ("ada@", {"u-ada"}),
        ("LOVELACE", {"u-ada"}),
        ("+1415", {"u-ada"}),
        ("+14155550100", {"u-ada"}),
        ("ADA@example.com", {"u-ada"}),
        ("da@example.com", set()),  # a whole address matches exactly
        ("u-bob", {"u-bob"}),
        ("plan=pro", {"u-ada"}),
        ("plan=free", {"u-bob"}),
        ("seats=5", {"u-ada"}),
        ("plan=pro bob", set()),
        ("example.com", {"u-ada", "u-bob"}),
        ("100%_", set()),
        ("\x00", {"u-ada", "u-bob"}),
        ('"unbalanced', set()),
    ],
)
def test_search(login_as, people, foreign, query, found):
    client = login_as(Role.VIEWER)
    page = client.get("/recipients", query_string={"q": query}).get_data(as_text=True)
    assert {e for e in ("u-ada", "u-bob") if f">{e}<" in page} == found
    assert "u-foreign" not in page


def test_htmx_search_returns_the_results_fragment(login_as, people):
    client = login_as(Role.VIEWER)
    response = client.get(
        "/recipients", query_string={"q": "ada"}, headers={**HX, "HX-Target": "recipient-results"}
    )
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert page.lstrip().startswith('<div id="recipient-results"')
    assert "<html" not in page and "u-ada" in page


def test_empty_states(login_as, people):
    client = login_as(Role.EDITOR)
    page = client.get("/recipients", query_string={"q": "nobody-at-all"}).get_data(as_text=True)
    assert "No recipient matches" in page


def test_empty_organization_says_what_to_do(login_as, make_org):
    page = login_as(Role.EDITOR, organization=make_org()).get("/recipients").get_data(as_text=True)
    assert "No recipients yet" in page and "import a CSV file" in page


def test_cursor_pagination(login_as, org, make_recipient):
    for i in range(55):
        make_recipient(org, f"p-{i:03d}")
    client = login_as(Role.VIEWER)
    first = client.get("/recipients").get_data(as_text=True)
    assert ">p-054<" in first and ">p-005<" in first and ">p-004<" not in first
    assert "Load more" in first
    cursor = first.split("after=")[1].split('"')[0]
    more = client.get(
        f"/recipients?after={cursor}", headers={**HX, "HX-Target": "recipient-more"}
    ).get_data(as_text=True)
    assert more.lstrip().startswith("<tr>")
    assert ">p-004<" in more and ">p-000<" in more and ">p-005<" not in more
    assert "Load more" not in more
    assert client.get("/recipients?after=99999999999999999999999").status_code == 200


# --- profile ----------------------------------------------------------------------------


@pytest.fixture
def categories(org):  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        billing = Category(key="billing", name="Billing", critical=True)
        news = Category(key="news", name="Newsletter")
        db.session.add_all([billing, news])
        db.session.flush()
        create_topic("launches", "Product launches", actor=SYSTEM)
        create_topic("digest", "Weekly digest", actor=SYSTEM)
    return billing, news


@pytest.mark.parametrize("role", list(Role))
def test_profile_page(login_as, people, categories, role):
    ada, _ = people
    with organization_scope(ada.organization_id):
        subscribe("digest", ["u-ada"], actor=SYSTEM)
    page = login_as(role).get(f"/recipients/{ada.id}").get_data(as_text=True)
    assert "Ada Lovelace" in page and "+14155550100" in page
    assert "plan" in page and "pro" in page and "seats" in page
    assert "Weekly digest" in page and "Subscribed" in page
    assert "Newsletter" in page and "critical" in page
    assert ("Save preferences" in page) == (role != Role.VIEWER)


def test_foreign_and_unknown_recipients_are_404(login_as, foreign):
    client = login_as(Role.OWNER)
    for url in (f"/recipients/{foreign.id}", "/recipients/0", "/recipients/99999999999999999999"):
        assert client.get(url).status_code == 404
    assert _post(client, f"/recipients/{foreign.id}/preferences").status_code == 404
    assert _post(client, f"/recipients/{foreign.id}/topics/x/subscribe").status_code == 404


def _pref_form(**cells):  # type: ignore[no-untyped-def]
    """Every visible cell as shown (all on), then the changes asked for."""
    data = {}
    for channel in ("email", "sms", "push", "in_app", "webhook"):
        for key in ("*", "news"):
            data[f"was:{channel}:{key}"] = "1"
            data[f"on:{channel}:{key}"] = "on"
    for name, value in cells.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def test_editor_changes_preferences_audited(login_as, people, categories):
    ada, _ = people
    client = login_as(Role.EDITOR)
    data = _pref_form(**{"on:email:news": None})
    data.update(quiet_start="22:00", quiet_end="07:00", timezone="Europe/Berlin")
    response = _post(client, f"/recipients/{ada.id}/preferences", data, headers=HX)
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert page.lstrip().startswith("{% set") is False and "<html" not in page
    assert "Preferences saved." in page
    with organization_scope(ada.organization_id):
        rows = db.session.execute(select(Preference.channel, Preference.enabled)).all()
        assert [(str(c), e) for c, e in rows] == [("email", False)]
        recipient = db.session.get(Recipient, ada.id)
        assert recipient.timezone == "Europe/Berlin"
        assert recipient.quiet_hours_start.hour == 22
        actions = set(db.session.scalars(select(AuditLog.action)))
    assert {"recipient.preferences_updated", "recipient.updated"} <= actions


def test_preferences_full_page_post_redirects(login_as, people, categories):
    ada, _ = people
    client = login_as(Role.EDITOR)
    response = _post(client, f"/recipients/{ada.id}/preferences", _pref_form())
    assert response.status_code == 303
    assert "Preferences saved." in client.get(response.headers["Location"]).get_data(as_text=True)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"quiet_start": "22:00"}, "Give both a start and an end"),
        ({"quiet_start": "25:00", "quiet_end": "07:00"}, "Use a time like 22:00."),
        ({"quiet_start": "07:00", "quiet_end": "07:00"}, "Must differ from the start."),
        ({"timezone": "Mars/Olympus"}, "Not an IANA time zone"),
        ({"was:email:nope": "1"}, "No category"),
    ],
)
def test_invalid_preferences_rerender_with_422_and_save_nothing(
    login_as, people, categories, fields, message
):
    ada, _ = people
    client = login_as(Role.EDITOR)
    data = _pref_form(**{"on:sms:*": None})
    data.update(fields)
    response = _post(client, f"/recipients/{ada.id}/preferences", data, headers=HX)
    assert response.status_code == 422
    assert message in response.get_data(as_text=True)
    with organization_scope(ada.organization_id):
        assert db.session.scalars(select(Preference)).all() == []
        assert db.session.get(Recipient, ada.id).timezone is None


def test_viewer_cannot_change_anything(login_as, people, categories):
    ada, _ = people
    client = login_as(Role.VIEWER)
    assert _post(client, f"/recipients/{ada.id}/preferences", _pref_form()).status_code == 403
    assert _post(client, f"/recipients/{ada.id}/topics/digest/subscribe").status_code == 403
    assert client.get("/recipients/import").status_code == 403
    assert client.get("/recipients/export").status_code == 403


def test_csrf_is_required(login_as, people, categories):
    ada, _ = people
    client = login_as(Role.EDITOR)
    for url in (f"/recipients/{ada.id}/preferences", f"/recipients/{ada.id}/topics/x/subscribe"):
        response = client.post(url, data={}, headers=HX)
        assert response.status_code == 400
    assert client.post("/recipients/import", data={}).status_code == 303  # back to the form


def test_subscribe_and_unsubscribe(login_as, people, categories):
    ada, _ = people
    client = login_as(Role.EDITOR)
    response = _post(client, f"/recipients/{ada.id}/topics/launches/subscribe", headers=HX)
    page = response.get_data(as_text=True)
    assert response.status_code == 200 and page.lstrip().startswith('<div id="recipient-topics"')
    assert "Unsubscribe" in page
    _post(client, f"/recipients/{ada.id}/topics/launches/subscribe", headers=HX)  # no change
    response = _post(client, f"/recipients/{ada.id}/topics/launches/unsubscribe")
    assert response.status_code == 303
    assert _post(client, f"/recipients/{ada.id}/topics/nope/subscribe").status_code == 404
    with organization_scope(ada.organization_id):
        entries = db.session.scalars(
            select(AuditLog).where(AuditLog.target_type == "recipient").order_by(AuditLog.id)
        ).all()
    assert [(e.action, e.target_id, e.changes) for e in entries] == [
        ("recipient.subscribed", str(ada.id), {"topic": "launches"}),
        ("recipient.unsubscribed", str(ada.id), {"topic": "launches"}),
    ]


# --- import -----------------------------------------------------------------------------


def _upload(client, text, name="people.csv"):  # type: ignore[no-untyped-def]
    return _post(
        client,
        "/recipients/import",
        {"file": (io.BytesIO(text.encode()), name)},
        content_type="multipart/form-data",
    )


def _import_id(response) -> str:  # type: ignore[no-untyped-def]
    assert response.status_code == 303, response.get_data(as_text=True)
    return response.headers["Location"].rsplit("/", 1)[1]


def test_import_form_and_upload_errors(login_as, monkeypatch):
    from whistle_web.console import recipients as view

    monkeypatch.setattr(view, "MAX_IMPORT_BYTES", 4096)
    client = login_as(Role.EDITOR)
    assert "Check and import" in client.get("/recipients/import").get_data(as_text=True)
    response = _post(client, "/recipients/import", {}, content_type="multipart/form-data")
    assert response.status_code == 422 and "Choose a CSV file." in response.get_data(as_text=True)
    response = _upload(client, "")
    assert response.status_code == 422 and "The file is empty." in response.get_data(as_text=True)
    response = _upload(client, "external_id\n" + "x" * 4096)
    assert response.status_code == 422
    assert "The file is larger than 4 KB." in response.get_data(as_text=True)


def test_import_with_an_invalid_row_imports_nothing(login_as, org, people, redis):
    client = login_as(Role.EDITOR)
    text = (
        "external_id,email,phone,timezone,plan\n"
        "u-new,new@example.com,+14155550101,Europe/Paris,pro\n"
        "u-ada,ada2@example.com,,,\n"
        ",nobody@example.com,,,\n"
        "u-bad,not-an-email,12345,Nowhere/Land,\n"
    )
    import_id = _import_id(_upload(client, text))
    page = client.get(f"/recipients/import/{import_id}").get_data(as_text=True)
    assert "Waiting for a worker" in page and 'hx-trigger="every 1s"' in page
    run_jobs(redis)
    response = client.get(f"/recipients/import/{import_id}", headers=HX)
    assert response.status_code == 286  # htmx stops polling
    page = response.get_data(as_text=True)
    assert "Nothing was imported: 4 problems" in page
    assert "every 1s" not in page
    for line, field in ((4, "external_id"), (5, "email"), (5, "phone"), (5, "timezone")):
        assert f'<td class="num">{line}</td><td><code>{field}</code>' in page
    with organization_scope(org.id):
        assert db.session.scalar(select(Recipient).where(Recipient.external_id == "u-new")) is None
        assert db.session.get(Recipient, people[0].id).email == "ada@example.com"


def test_import_creates_and_updates_in_one_go(login_as, org, people, redis):
    client = login_as(Role.EDITOR)
    text = (
        "external_id,email,phone,name,timezone,plan,attributes\n"
        'u-new,New@Example.com,+14155550101,Newt,Europe/Paris,pro,"{""seats"": 3}"\n'
        "u-ada,,,,,team,\n"
    )
    import_id = _import_id(_upload(client, text))
    assert run_jobs(redis) == 1
    page = client.get(f"/recipients/import/{import_id}").get_data(as_text=True)
    assert "Imported 2 recipients: 1 new, 1 updated." in page
    with organization_scope(org.id):
        new = db.session.scalar(select(Recipient).where(Recipient.external_id == "u-new"))
        assert new.email == "new@example.com" and new.timezone == "Europe/Paris"
        assert new.attributes == {"plan": "pro", "seats": 3}
        ada = db.session.get(Recipient, people[0].id)
        db.session.refresh(ada)
        assert ada.email == "ada@example.com"  # an empty cell changes nothing
        assert ada.attributes == {"plan": "team", "seats": 5}
        entry = db.session.scalar(select(AuditLog).where(AuditLog.action == "recipients.imported"))
        assert entry.changes == {"rows": 2, "created": 1, "updated": 1}


def test_a_failure_midway_imports_nothing(login_as, org, redis, monkeypatch):
    from whistle_web.recipients import csv_io
    from workers.queues import QUEUES
    from workers.worker import WhistleSimpleWorker

    real, calls = csv_io.upsert_recipients, []

    def flaky(profiles):  # type: ignore[no-untyped-def]
        calls.append(len(profiles))
        if len(calls) == 2:
            raise RuntimeError("database went away")
        return real(profiles)

    monkeypatch.setattr(csv_io, "upsert_recipients", flaky)
    client = login_as(Role.EDITOR)
    rows = "".join(f"m-{i},m{i}@example.com\n" for i in range(csv_io.CHUNK + 10))
    import_id = _import_id(_upload(client, "external_id,email\n" + rows))
    WhistleSimpleWorker(list(QUEUES), connection=redis).work(burst=True)
    assert calls == [csv_io.CHUNK, 10]
    page = client.get(f"/recipients/import/{import_id}").get_data(as_text=True)
    assert "The import failed and nothing was imported" in page
    with organization_scope(org.id):
        assert db.session.scalars(select(Recipient)).all() == []


def test_import_status_of_another_organization_is_404(login_as, other_org, redis):
    foreign_client = login_as(Role.EDITOR, organization=other_org)
    import_id = _import_id(_upload(foreign_client, "external_id\nx-1\n"))
    client = login_as(Role.EDITOR)
    assert client.get(f"/recipients/import/{import_id}").status_code == 404
    assert client.get("/recipients/import/not-an-id").status_code == 404
    assert client.get(f"/recipients/import/{'0' * 32}").status_code == 404


# --- export -----------------------------------------------------------------------------


def _csv(response) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    return list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))


def test_export_everything_of_the_organization(login_as, people, foreign, make_recipient, org):
    make_recipient(org, "u-formula", name="=HYPERLINK(1)")
    client = login_as(Role.EDITOR)
    response = client.get("/recipients/export")
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert response.is_streamed
    assert 'filename="recipients-all.csv"' in response.headers["Content-Disposition"]
    rows = _csv(response)
    assert [r["external_id"] for r in rows] == ["u-ada", "u-bob", "u-formula"]
    assert rows[0]["phone"] == "+14155550100"
    assert rows[0]["attributes"] == '{"plan": "pro", "seats": 5}'
    assert rows[2]["name"] == "'=HYPERLINK(1)"


def test_export_a_segment(login_as, org, other_org, people):
    with organization_scope(org.id):
        segment = create_segment(
            "Pro",
            {
                "op": "and",
                "rules": [{"field": "attributes.plan", "operator": "eq", "value": "pro"}],
            },
            actor=SYSTEM,
        )
    client = login_as(Role.EDITOR)
    rows = _csv(client.get(f"/recipients/export?segment={segment.id}"))
    assert [r["external_id"] for r in rows] == ["u-ada"]
    foreign = login_as(Role.EDITOR, organization=other_org)
    assert foreign.get(f"/recipients/export?segment={segment.id}").status_code == 404
    assert client.get("/recipients/export?segment=abc").status_code == 404
