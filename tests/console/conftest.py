"""Console test helpers: a client signed in as a member with a given role, CSRF tokens."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.factories import PASSWORD
from whistle_web.accounts.models import Role


def csrf_token(client: FlaskClient, path: str = "/login") -> str:
    """The CSRF token the page at ``path`` carries (a form field or the meta tag)."""
    page = client.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page) or re.search(
        r'name="csrf-token" content="([^"]+)"', page
    )
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def sign_in(client: FlaskClient, email: str, password: str, **query: Any) -> Any:
    token = csrf_token(client)
    return client.post(
        "/login",
        query_string=query,
        data={"email": email, "password": password, "csrf_token": token},
    )


@pytest.fixture
def login_as(app, org, make_user) -> Callable[..., FlaskClient]:  # type: ignore[no-untyped-def]
    """``login_as(Role.EDITOR)``: a new test client signed in as a new member of ``org``
    (or of ``organization=``) with that role. The client keeps its ``.csrf`` token for posts.
    """

    def login(role: Role = Role.OWNER, *, organization: Any = None) -> FlaskClient:
        user = make_user(org=organization or org, role=role)
        client = app.test_client()
        response = sign_in(client, user.email, PASSWORD)
        assert response.status_code == 302, response.get_data(as_text=True)
        client.csrf = csrf_token(client, "/")  # type: ignore[attr-defined]
        client.user = user  # type: ignore[attr-defined]
        return client

    return login
