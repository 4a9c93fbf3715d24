"""Roles in the console: ``requires`` on routes, ``can`` in templates, the section list."""

from __future__ import annotations

import pytest
from flask import render_template_string

from whistle_web.accounts.models import Role
from whistle_web.console import access

MATRIX = {
    Role.VIEWER: {"view"},
    Role.EDITOR: {"view", "edit", "send"},
    Role.ADMIN: {"view", "edit", "send", "manage"},
    Role.OWNER: {"view", "edit", "send", "manage", "own"},
}


@pytest.fixture
def probe(app):  # type: ignore[no-untyped-def]
    """A route per action, and one showing what ``can`` says, added to the app once.

    The session's app has served requests already; Flask refuses new routes then, to protect
    real setup code. These test-only routes are added with that guard lifted.
    """
    if "probe_can" in app.view_functions:
        return
    started, app._got_first_request = app._got_first_request, False
    try:
        _add_probes(app)
    finally:
        app._got_first_request = started


def _add_probes(app):  # type: ignore[no-untyped-def]
    for action in access.ACTIONS:
        view = access.requires(action)(lambda action=action: f"allowed: {action}")
        app.add_url_rule(f"/_probe/{action}", f"probe_{action}", view)
    app.add_url_rule(
        "/_probe/can",
        "probe_can",
        access.requires("view")(
            lambda: render_template_string(
                "{% for a in actions %}{% if can(a) %}{{ a }} {% endif %}{% endfor %}",
                actions=list(access.ACTIONS),
            )
        ),
    )


@pytest.mark.parametrize("role", list(MATRIX))
def test_each_role_reaches_exactly_its_actions(login_as, probe, role):
    client = login_as(role)
    for action in access.ACTIONS:
        response = client.get(f"/_probe/{action}")
        expected = 200 if action in MATRIX[role] else 403
        assert response.status_code == expected, (role, action)
    assert set(client.get("/_probe/can").get_data(as_text=True).split()) == MATRIX[role]


def test_anonymous_users_are_sent_to_sign_in(client, probe):
    response = client.get("/_probe/view")
    assert response.status_code == 302
    assert "/login" in response.headers["Location"]


def test_a_user_without_a_membership_gets_403(app, make_user, probe):
    from tests.console.conftest import sign_in
    from tests.factories import PASSWORD

    user = make_user()  # in no organization: sign-in refuses them
    client = app.test_client()
    assert sign_in(client, user.email, PASSWORD).status_code == 401
    assert client.get("/_probe/view").status_code == 302


def test_unknown_actions_are_a_programming_error():
    with pytest.raises(ValueError, match="unknown console action"):
        access.requires("launch")


def test_navigation_lists_registered_sections_and_marks_the_current_one(login_as):
    client = login_as(Role.VIEWER)
    page = client.get("/").get_data(as_text=True)
    assert '<a href="/" aria-current="page">Dashboard</a>' in page


def test_two_signed_in_clients_in_one_test_stay_two_users(login_as, org):
    viewer = login_as(Role.VIEWER)
    owner = login_as(Role.OWNER)
    assert viewer.user.email in viewer.get("/").get_data(as_text=True)
    assert owner.user.email in owner.get("/").get_data(as_text=True)
    assert viewer.user.email in viewer.get("/").get_data(as_text=True)
