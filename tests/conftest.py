"""Fixtures: a real PostgreSQL and Redis, the app, and a rolled-back transaction per test.

``WHISTLE_TEST_DATABASE_URL`` / ``WHISTLE_TEST_REDIS_URL`` point at servers to use (CI sets
them); without them the embedded servers under ``.data/test`` are started. The schema is
built by running the migrations, so every run also checks them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from flask import Flask, g, request_started
from flask.testing import FlaskClient
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import make_url

from whistle_web import create_app
from whistle_web.extensions import db as _db
from whistle_web.tenancy import TenantSession

ROOT = Path(__file__).resolve().parent.parent
TEST_DATABASE = "whistle_test"


class RollbackSession(TenantSession):
    """The app's session, pinned to the test's connection.

    Flask-SQLAlchemy's session picks its engine itself and would ignore ``bind``.
    """

    def get_bind(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        return self.bind


def _service_urls() -> tuple[str, str]:
    database_url = os.environ.get("WHISTLE_TEST_DATABASE_URL")
    redis_url = os.environ.get("WHISTLE_TEST_REDIS_URL")
    if database_url and redis_url:
        return database_url, redis_url
    from whistle_web.embedded import EmbeddedServices

    urls = EmbeddedServices(ROOT / ".data" / "test").start(database=TEST_DATABASE)
    return database_url or urls.database, redis_url or urls.redis


def admin_conninfo(database_url: str, database: str = "postgres") -> str:
    """A psycopg connection string for another database on the same server."""
    url = make_url(database_url).set(drivername="postgresql", database=database)
    return url.render_as_string(hide_password=False)


# What the console caches on ``g`` for one request (user, CSRF token, membership).
PER_REQUEST_G = (
    "_login_user",
    "csrf_token",
    "csrf_valid",
    "membership",
    "organization",
    "account_organizations",
)


def _forget_cached_user(sender: Flask, **extra: object) -> None:
    for name in PER_REQUEST_G:
        g.pop(name, None)


def recreate_database(database_url: str) -> None:
    name = make_url(database_url).database
    with psycopg.connect(admin_conninfo(database_url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def sqlalchemy_url(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql+psycopg").render_as_string(False)


@pytest.fixture(scope="session")
def service_urls() -> tuple[str, str]:
    return _service_urls()


@pytest.fixture(scope="session")
def app(service_urls: tuple[str, str]) -> Iterator[Flask]:
    database_url, redis_url = service_urls
    recreate_database(database_url)
    app = create_app(
        {
            "WHISTLE_ENV": "test",
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": sqlalchemy_url(database_url),
            "REDIS_URL": redis_url,
            "WHISTLE_FAST_PASSWORD_HASH": True,
            "SERVER_NAME": "whistle.test",
        }
    )
    with app.app_context():
        from flask_migrate import upgrade

        upgrade()
        _db.engine.dispose()
    # Tests push one app context for their whole body, so every request of a test shares
    # ``g``, where Flask-Login caches the signed-in user and Flask-WTF the CSRF token: forget
    # them at each request, as a fresh production request does, so two clients in one test
    # stay two users with two sessions.
    request_started.connect(_forget_cached_user, app)
    yield app
    with app.app_context():
        _db.engine.dispose()


@pytest.fixture
def redis(app: Flask):  # type: ignore[no-untyped-def]
    from whistle_web import get_redis

    client = get_redis(app)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(autouse=True)
def _fresh_sign_in_limits(app: Flask) -> None:
    """Every test starts with the console's sign-in budgets untouched: failed sign-ins of
    earlier tests (all from 127.0.0.1) must not lock later ones out."""
    from whistle_web import get_redis

    client = get_redis(app)
    keys = list(client.scan_iter(match="LIMITS:LIMITER/whistle:console*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture(autouse=True)
def db(app: Flask, request: pytest.FixtureRequest) -> Iterator[object]:
    """Run the test in a transaction rolled back at the end (commits become savepoints)."""
    with app.app_context():
        if request.node.get_closest_marker("committed"):
            yield _db
            _db.session.remove()
            _truncate_all()
            return
        connection = _db.engine.connect()
        outer = connection.begin()
        original = _db.session
        _db.session = _db._make_scoped_session(
            {
                "class_": RollbackSession,
                "bind": connection,
                "join_transaction_mode": "create_savepoint",
            }
        )
        try:
            yield _db
        finally:
            _db.session.remove()
            _db.session = original
            outer.rollback()
            connection.close()


def _truncate_all() -> None:
    tables = ", ".join(f'"{t.name}"' for t in _db.metadata.sorted_tables)
    with _db.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask):  # type: ignore[no-untyped-def]
    return app.test_cli_runner()


from tests.factories import *  # noqa: E402, F403  (factory fixtures)
