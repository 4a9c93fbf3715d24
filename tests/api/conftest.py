"""An authenticated API client per organization."""

from __future__ import annotations

from typing import Any

import pytest

from tests.factories import SYSTEM
from whistle_web.accounts.services import create_api_key
from whistle_web.tenancy import organization_scope


class ApiClient:
    def __init__(self, client: Any, token: str | None) -> None:
        self.client = client
        self.token = token

    def _headers(self, headers: dict[str, str] | None) -> dict[str, str]:
        out = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        out.update(headers or {})
        return out

    def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ):  # type: ignore[no-untyped-def]
        return self.client.open(
            f"/api/v1{path}", method=method, headers=self._headers(headers), **kwargs
        )

    def get(self, path: str, **kwargs: Any):  # type: ignore[no-untyped-def]
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any):  # type: ignore[no-untyped-def]
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any):  # type: ignore[no-untyped-def]
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any):  # type: ignore[no-untyped-def]
        return self.request("DELETE", path, **kwargs)


@pytest.fixture
def make_api(client):  # type: ignore[no-untyped-def]
    def make(org: Any, scopes: list[str] | None = None) -> ApiClient:
        with organization_scope(org.id):
            issued = create_api_key("tests", scopes=scopes, actor=SYSTEM)
        return ApiClient(client, issued.secret)

    return make


@pytest.fixture
def api(org, make_api):  # type: ignore[no-untyped-def]
    return make_api(org)


@pytest.fixture
def other_api(other_org, make_api):  # type: ignore[no-untyped-def]
    return make_api(other_org)


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.json
    assert body["status"] == status and body["title"] and body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body.get("errors", [])], body
    return body
