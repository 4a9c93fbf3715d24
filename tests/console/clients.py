"""Several signed-in test clients in one test.

A test keeps one application context open (the ``db`` fixture), and requests reuse it, so
``g`` outlives a request: Flask-Login caches the signed-in user there and Flask-WTF the
session's CSRF token. A second client would then act as the first one's user. ``isolated``
makes each request of a client start without those caches.
"""

from __future__ import annotations

from typing import Any

from flask import g
from flask.testing import FlaskClient


def forget_request_caches() -> None:
    g.pop("_login_user", None)
    g.pop("csrf_token", None)
    g.pop("account_organizations", None)


def isolated(client: FlaskClient) -> FlaskClient:
    original = client.open

    def open_fresh(*args: Any, **kwargs: Any) -> Any:
        forget_request_caches()
        return original(*args, **kwargs)

    client.open = open_fresh  # type: ignore[method-assign]
    return client
