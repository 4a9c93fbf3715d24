"""Segments in the console: the list, the builder (htmx round trips), save, rename, delete."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.factories import SYSTEM
from whistle_web.accounts.models import Role
from whistle_web.audiences import services
from whistle_web.audiences.models import Segment
from whistle_web.campaigns.models import AudienceType, Campaign, CampaignStatus
from whistle_web.extensions import db
from whistle_web.organizations.models import AuditLog
from whistle_web.tenancy import organization_scope

HX = {"HX-Request": "true"}
PRO = {"op": "and", "rules": [{"field": "attributes.plan", "operator": "eq", "value": "pro"}]}


@pytest.fixture
def people(org, make_recipient):  # type: ignore[no-untyped-def]
    plans = {"ada": "pro", "bob": "free", "cy": "pro", "di": None}
    return {
        key: make_recipient(
            org, key, email=f"{key}@example.com", attributes={"plan": plan} if plan else {}
        )
        for key, plan in plans.items()
    }


def make_segment(org: Any, name: str = "Pro", rules: dict[str, Any] = PRO) -> Segment:
    with organization_scope(org.id):
        return services.create_segment(name, rules, actor=SYSTEM)


def audit(org: Any, action: str) -> list[AuditLog]:
    with organization_scope(org.id):
        return list(db.session.scalars(select(AuditLog).where(AuditLog.action == action)))


def builder_form(client: Any, *conditions: dict[str, str], **extra: str) -> dict[str, Any]:
    """Form fields for a root group of plain conditions: ``{"kind": ..., "operator": ...}``."""
    form: dict[str, Any] = {"csrf_token": client.csrf, "r.op": "and", "node": []}
    for i, condition in enumerate(conditions):
        form["node"].append(f"r.{i}")
        form.update({f"r.{i}.{k}": v for k, v in condition.items()})
    form.update(extra)
    return form


PLAN_PRO = {"kind": "attribute", "key": "plan", "type": "text", "operator": "eq", "value": "pro"}


# --- roles and access -------------------------------------------------------------------

VIEW_ROUTES = [("GET", "/segments"), ("GET", "/segments/{id}"), ("GET", "/segments/{id}/count")]
EDIT_ROUTES = [
    ("GET", "/segments/new"),
    ("POST", "/segments/new"),
    ("GET", "/segments/{id}/edit"),
    ("POST", "/segments/{id}/edit"),
    ("POST", "/segments/{id}/rename"),
    ("POST", "/segments/{id}/delete"),
    ("POST", "/segments/builder"),
    ("POST", "/segments/preview"),
]


@pytest.mark.parametrize("role", [Role.VIEWER, Role.EDITOR, Role.ADMIN, Role.OWNER])
def test_each_route_allows_exactly_its_roles(login_as, org, role, redis):
    client = login_as(role)
    segment = make_segment(org)
    for method, path in VIEW_ROUTES + EDIT_ROUTES:
        url = path.format(id=segment.id)
        data = {"csrf_token": client.csrf} if method == "POST" else None
        response = client.open(url, method=method, data=data)
        forbidden = role == Role.VIEWER and (method, path) in EDIT_ROUTES
        if forbidden:
            assert response.status_code == 403, (role, method, path)
        else:
            assert response.status_code != 403, (role, method, path)
            assert response.status_code < 500, (role, method, path)


def test_anonymous_users_are_sent_to_sign_in(client, org):
    from tests.console.conftest import csrf_token

    segment = make_segment(org)
    token = csrf_token(client)
    for method, path in VIEW_ROUTES + EDIT_ROUTES:
        data = {"csrf_token": token} if method == "POST" else None
        response = client.open(path.format(id=segment.id), method=method, data=data)
        assert response.status_code == 302, path
        assert "/login" in response.headers["Location"]


def test_viewers_see_no_edit_controls(login_as, org, people, redis):
    segment = make_segment(org)
    client = login_as(Role.VIEWER)
    listing = client.get("/segments").get_data(as_text=True)
    assert "New segment" not in listing
    page = client.get(f"/segments/{segment.id}").get_data(as_text=True)
    assert "Edit rules" not in page and "Delete" not in page and "Rename" not in page
    assert 'id="segment-count">2<' in page


def test_posts_without_a_csrf_token_change_nothing(login_as, org):
    client = login_as(Role.EDITOR)
    segment = make_segment(org)
    form = builder_form(client, PLAN_PRO, name="Sneaky")
    del form["csrf_token"]
    assert client.post("/segments/new", data=form).status_code == 303  # back to the form
    assert client.post("/segments/new", data=form, headers=HX).status_code == 400
    assert client.post(f"/segments/{segment.id}/delete").status_code == 303
    assert client.post(f"/segments/{segment.id}/rename", data={"name": "X"}).status_code == 303
    with organization_scope(org.id):
        assert [s.name for s in db.session.scalars(select(Segment))] == ["Pro"]


def test_other_organizations_segments_are_404(login_as, org, other_org, redis):
    foreign = make_segment(other_org, "Theirs")
    client = login_as(Role.OWNER)
    for method, path in VIEW_ROUTES + EDIT_ROUTES:
        if "{id}" not in path:
            continue
        data = {"csrf_token": client.csrf, "name": "Mine"} if method == "POST" else None
        response = client.open(path.format(id=foreign.id), method=method, data=data)
        assert response.status_code == 404, path
    assert client.get("/segments/99999999999999999999").status_code == 404
    with organization_scope(other_org.id):
        assert services.get_segment(foreign.id).name == "Theirs"


# --- the list ---------------------------------------------------------------------------


def test_empty_list_says_what_to_do(login_as):
    page = login_as(Role.EDITOR).get("/segments").get_data(as_text=True)
    assert "No segments yet" in page and "Build the first segment" in page


def test_list_shows_name_rules_lazy_count_and_last_edit(login_as, org, people, redis):
    segment = make_segment(org)
    client = login_as(Role.VIEWER)
    page = client.get("/segments").get_data(as_text=True)
    assert ">Pro</a>" in page and "plan is pro" in page
    assert f'hx-get="/segments/{segment.id}/count"' in page
    assert segment.updated_at.strftime("%Y-%m-%d") in page
    assert client.get(f"/segments/{segment.id}/count").get_data(as_text=True).strip() == "2"
    # Cached for a minute: a new pro recipient shows up on the next minute's count.
    assert redis.keys("whistle:segment-count:*")


def test_navigation_names_the_section(login_as):
    page = login_as(Role.VIEWER).get("/segments").get_data(as_text=True)
    assert '<a href="/segments" aria-current="page">Segments</a>' in page


# --- building and saving ----------------------------------------------------------------


def test_new_segment_page_has_an_empty_builder_and_everyone_counted(login_as, people):
    page = login_as(Role.EDITOR).get("/segments/new").get_data(as_text=True)
    assert 'id="segment-builder"' in page and "everyone matches" in page
    assert 'id="segment-count">4<' in page
    assert "<script" in page and "js/segments.js" in page


def test_create_a_segment_from_builder_fields(login_as, org, people):
    client = login_as(Role.EDITOR)
    form = builder_form(client, PLAN_PRO, name="Pro users", description="Paying")
    response = client.post("/segments/new", data=form)
    assert response.status_code == 303, response.get_data(as_text=True)
    with organization_scope(org.id):
        segment = db.session.scalar(select(Segment).where(Segment.name == "Pro users"))
    assert segment.rules == PRO and segment.description == "Paying"
    assert response.headers["Location"].endswith(f"/segments/{segment.id}")
    assert audit(org, "segment.created")[0].target_id == str(segment.id)
    page = client.get(f"/segments/{segment.id}").get_data(as_text=True)
    assert 'id="segment-count">2<' in page and "ada" in page and "cy" in page


def test_nested_groups_and_every_condition_kind_round_trip(login_as, org, people):
    client = login_as(Role.EDITOR)
    form = {
        "csrf_token": client.csrf,
        "name": "Mixed",
        "r.op": "or",
        "node": ["r.0", "r.1", "r.1.0", "r.1.1", "r.1.2", "r.1.3"],
        **{f"r.0.{k}": v for k, v in PLAN_PRO.items()},
        "r.1.group": "1",
        "r.1.op": "and",
        "r.1.0.kind": "created_at",
        "r.1.0.operator": "in_last_days",
        "r.1.0.value": "30",
        "r.1.1.kind": "attribute",
        "r.1.1.key": "seats",
        "r.1.1.type": "number",
        "r.1.1.operator": "between",
        "r.1.1.value": "1",
        "r.1.1.value2": "2.5",
        "r.1.2.kind": "unsubscribed",
        "r.1.2.operator": "is_false",
        "r.1.3.kind": "engagement",
        "r.1.3.operator": "did_not",
        "r.1.3.event": "clicked",
        "r.1.3.days": "7",
    }
    assert client.post("/segments/new", data=form).status_code == 303
    with organization_scope(org.id):
        segment = db.session.scalar(select(Segment).where(Segment.name == "Mixed"))
    assert segment.rules == {
        "op": "or",
        "rules": [
            PRO["rules"][0],
            {
                "op": "and",
                "rules": [
                    {"field": "created_at", "operator": "in_last_days", "value": 30},
                    {"field": "attributes.seats", "operator": "between", "value": [1, 2.5]},
                    {"field": "unsubscribed", "operator": "is_false"},
                    {
                        "engagement": "clicked",
                        "operator": "did_not",
                        "campaign_id": None,
                        "days": 7,
                    },
                ],
            },
        ],
    }
    edit = client.get(f"/segments/{segment.id}/edit").get_data(as_text=True)
    for expected in ('id="r-1-1-value2" value="2.5"', 'id="r-1-3-days" value="7"'):
        assert expected in edit
    assert re.search(r'name="r.1.1.type".*?<option value="number" selected>', edit, re.S)


def test_invalid_input_re_renders_with_messages_and_saves_nothing(login_as, org, people):
    client = login_as(Role.EDITOR)
    bad = {"kind": "attribute", "key": "seats", "type": "number", "operator": "gt", "value": "lots"}
    response = client.post("/segments/new", data=builder_form(client, bad, name=""))
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert "Give the segment a name." in page
    assert re.search(r'id="err-r-0">Expected a number\.<', page)
    assert 'value="lots"' in page  # what was typed stays
    bad_key = dict(PLAN_PRO, key="a;drop")
    response = client.post("/segments/new", data=builder_form(client, bad_key, name="X"))
    assert response.status_code == 422
    assert "Name the attribute" in response.get_data(as_text=True)
    with organization_scope(org.id):
        assert db.session.scalar(select(Segment)) is None


def test_engagement_with_another_organizations_campaign_is_refused(
    login_as, org, other_org, make_template, people
):
    template = make_template(other_org)
    with organization_scope(other_org.id):
        theirs = Campaign(
            name="Theirs", template_id=template.id, channels=["email"], audience_type="all"
        )
        db.session.add(theirs)
        db.session.flush()
    client = login_as(Role.EDITOR)
    opened = {"kind": "engagement", "operator": "did", "event": "opened"}
    form = builder_form(client, dict(opened, campaign=str(theirs.id)), name="Openers")
    response = client.post("/segments/new", data=form)
    assert response.status_code == 422
    assert re.search(rf'id="err-r-0">No campaign {theirs.id}\.<', response.get_data(as_text=True))
    form = builder_form(client, dict(opened, days="30"), name="Openers")
    assert client.post("/segments/new", data=form).status_code == 303


def test_duplicate_names_are_refused(login_as, org, people):
    make_segment(org, "Pro")
    client = login_as(Role.EDITOR)
    response = client.post("/segments/new", data=builder_form(client, PLAN_PRO, name="Pro"))
    assert response.status_code == 422
    assert "already exists" in response.get_data(as_text=True)


def test_edit_saves_new_rules_and_audits(login_as, org, people):
    segment = make_segment(org)
    client = login_as(Role.EDITOR)
    free = dict(PLAN_PRO, value="free")
    response = client.post(
        f"/segments/{segment.id}/edit", data=builder_form(client, free, name="Free")
    )
    assert response.status_code == 303
    with organization_scope(org.id):
        db.session.expire_all()
        assert services.get_segment(segment.id).name == "Free"
        assert services.count_segment(segment.id) == 1
    assert set(audit(org, "segment.updated")[0].changes) >= {"name", "rules"}


# --- htmx round trips -------------------------------------------------------------------


def test_builder_adds_a_condition_and_answers_with_the_fragment(login_as, people):
    client = login_as(Role.EDITOR)
    form = builder_form(client, PLAN_PRO, action="add-condition:r")
    response = client.post("/segments/builder", data=form, headers=HX)
    assert response.status_code == 200
    fragment = response.get_data(as_text=True)
    assert "<html" not in fragment and fragment.lstrip().startswith('<div id="segment-builder"')
    assert 'name="r.1.kind"' in fragment and 'data-focus="r-1"' in fragment
    # The preview comes along out of band: plan = pro and email is set.
    assert 'hx-swap-oob="true"' in fragment and 'id="segment-count">2<' in fragment


def test_builder_adds_and_removes_groups(login_as, people):
    client = login_as(Role.EDITOR)
    added = client.post(
        "/segments/builder",
        data=builder_form(client, PLAN_PRO, action="add-group:r"),
        headers=HX,
    ).get_data(as_text=True)
    assert 'name="r.1.group"' in added and 'name="r.1.0.kind"' in added
    form = builder_form(client, PLAN_PRO, PLAN_PRO, action="remove:r.0")
    removed = client.post("/segments/builder", data=form, headers=HX).get_data(as_text=True)
    assert 'name="r.0.kind"' in removed and 'name="r.1.kind"' not in removed


def test_changing_what_a_condition_looks_at_offers_its_operators(login_as, people):
    client = login_as(Role.EDITOR)
    form = builder_form(client, {"kind": "created_at", "operator": "eq"})
    fragment = client.post("/segments/builder", data=form, headers=HX).get_data(as_text=True)
    assert '<option value="in_last_days" selected>' in fragment
    assert 'value="contains"' not in fragment
    assert "hx-swap-oob" not in fragment  # a select's change previews by itself


def test_without_javascript_the_builder_buttons_re_render_the_page(login_as, people):
    client = login_as(Role.EDITOR)
    response = client.post(
        "/segments/new", data=builder_form(client, PLAN_PRO, name="X", action="add-condition:r")
    )
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "<html" in page and 'name="r.1.kind"' in page


def test_preview_counts_samples_and_places_errors(login_as, people):
    client = login_as(Role.EDITOR)
    ok = client.post("/segments/preview", data=builder_form(client, PLAN_PRO), headers=HX)
    body = ok.get_data(as_text=True)
    assert ok.status_code == 200 and "<html" not in body
    assert 'id="segment-count">2<' in body and "ada@example.com" in body
    assert 'id="err-r-0" hx-swap-oob="true"></p>' in body
    bad = dict(PLAN_PRO, operator="in", value=" , ")
    body = client.post(
        "/segments/preview", data=builder_form(client, PLAN_PRO, bad), headers=HX
    ).get_data(as_text=True)
    assert "Expected a list of values." in body and 'id="segment-count">—<' in body


def test_preview_without_htmx_is_the_panel_alone(login_as, people):
    client = login_as(Role.EDITOR)
    body = client.post("/segments/preview", data=builder_form(client, PLAN_PRO)).get_data(
        as_text=True
    )
    assert body.lstrip().startswith('<section id="segment-preview"') and "hx-swap-oob" not in body


def test_a_statement_past_its_timeout_is_cancelled_and_the_transaction_lives_on(org):
    with organization_scope(org.id):
        with pytest.raises(services.QueryTimeout), services.statement_timeout(50):
            db.session.execute(select(func.pg_sleep(1)))
        assert db.session.scalar(select(func.current_setting("statement_timeout"))) == "0"
        assert db.session.scalar(select(func.count()).select_from(Segment)) == 0


def test_a_count_that_takes_too_long_shows_a_dash(login_as, people, monkeypatch):
    monkeypatch.setattr(
        services, "preview_rules", lambda rules, **kw: services.RulePreview(None, [], True)
    )
    client = login_as(Role.EDITOR)
    body = client.post(
        "/segments/preview", data=builder_form(client, PLAN_PRO), headers=HX
    ).get_data(as_text=True)
    assert 'id="segment-count">—<' in body and "Counting took too long" in body


# --- rename and delete ------------------------------------------------------------------


def test_rename_by_htmx_answers_the_title_and_audits(login_as, org, people):
    segment = make_segment(org)
    client = login_as(Role.EDITOR)
    url = f"/segments/{segment.id}/rename"
    response = client.post(url, data={"csrf_token": client.csrf, "name": "Paying"}, headers=HX)
    assert response.status_code == 200
    fragment = response.get_data(as_text=True)
    assert fragment.lstrip().startswith('<div id="segment-title"') and "<h1>Paying</h1>" in fragment
    assert audit(org, "segment.updated")[0].changes == {"name": "Paying"}
    empty = client.post(url, data={"csrf_token": client.csrf, "name": " "}, headers=HX)
    assert empty.status_code == 422 and "Give the segment a name." in empty.get_data(as_text=True)
    plain = client.post(url, data={"csrf_token": client.csrf, "name": "Paid"})
    assert plain.status_code == 303
    full = client.post(url, data={"csrf_token": client.csrf, "name": ""})
    assert full.status_code == 422 and "<html" in full.get_data(as_text=True)


def test_delete_removes_and_audits(login_as, org):
    segment = make_segment(org)
    client = login_as(Role.EDITOR)
    response = client.post(f"/segments/{segment.id}/delete", data={"csrf_token": client.csrf})
    assert response.status_code == 303 and response.headers["Location"].endswith("/segments")
    assert audit(org, "segment.deleted")
    assert client.get(f"/segments/{segment.id}").status_code == 404


@pytest.mark.parametrize("status", [CampaignStatus.SCHEDULED, CampaignStatus.SENDING])
def test_delete_is_refused_while_a_campaign_uses_the_segment(login_as, org, make_template, status):
    segment = make_segment(org)
    template = make_template(org)
    with organization_scope(org.id):
        db.session.add(
            Campaign(
                name="Spring sale",
                status=status,
                template_id=template.id,
                channels=["email"],
                audience_type=AudienceType.SEGMENT,
                segment_id=segment.id,
            )
        )
        db.session.flush()
    client = login_as(Role.EDITOR)
    response = client.post(f"/segments/{segment.id}/delete", data={"csrf_token": client.csrf})
    assert response.status_code == 409
    page = response.get_data(as_text=True)
    assert "Not deleted" in page and "Spring sale" in page and str(status) in page
    with organization_scope(org.id):
        assert services.get_segment(segment.id)
    assert not audit(org, "segment.deleted")
