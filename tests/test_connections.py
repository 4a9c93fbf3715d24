"""Pooled connections are checked at checkout without a round trip, and replaced when dead."""

from __future__ import annotations

import time

import psycopg
from sqlalchemy import create_engine, event, text

from tests.conftest import admin_conninfo
from whistle_web import connections
from whistle_web.extensions import db


def _engine(database_url: str):  # type: ignore[no-untyped-def]
    engine = create_engine(
        database_url.replace("postgresql://", "postgresql+psycopg://", 1), pool_size=1
    )
    connections.watch(engine)
    return engine


def _backend_pid(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def _terminate(database_url: str, pid: int) -> None:
    with psycopg.connect(admin_conninfo(database_url), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])


def test_the_app_checks_connections_at_checkout_without_pre_ping(app) -> None:
    assert event.contains(db.engine, "checkout", connections.check_on_checkout)
    assert db.engine.pool._pre_ping is False


def test_a_healthy_connection_is_reused_without_a_statement(service_urls) -> None:
    database_url, _ = service_urls
    engine = _engine(database_url)
    statements: list[str] = []
    try:
        pid = _backend_pid(engine)

        @event.listens_for(engine, "before_cursor_execute")
        def record(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
            statements.append(statement)

        with engine.connect() as conn:
            assert conn.connection.dbapi_connection.info.backend_pid == pid
        assert statements == []
    finally:
        engine.dispose()


def test_a_connection_the_server_terminated_is_replaced(service_urls) -> None:
    database_url, _ = service_urls
    engine = _engine(database_url)
    try:
        first = _backend_pid(engine)
        _terminate(database_url, first)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the server's goodbye reaches the socket
            with engine.pool.connect() as fairy:
                if fairy.dbapi_connection.info.backend_pid != first:
                    break
            time.sleep(0.05)
        second = _backend_pid(engine)
        assert second != first
    finally:
        engine.dispose()


def test_readable_while_idle_sees_input_and_close() -> None:
    import socket

    left, right = socket.socketpair()
    try:
        assert not connections.readable_while_idle(left.fileno())
        right.send(b"x")
        assert connections.readable_while_idle(left.fileno())
        left.recv(1)
        right.close()
        assert connections.readable_while_idle(left.fileno())  # end of file
    finally:
        left.close()


def test_can_autocommit_only_without_work_the_session_would_commit(app, org) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.orm import Session

    from whistle_web.models import Topic

    # The tests' sessions are bound into an outer transaction: never outside it.
    assert not connections.can_autocommit(db.session())
    with Session(db.engine) as session:
        assert connections.can_autocommit(session)  # no transaction
        topic = Topic(organization_id=org.id, key="k", name="K")
        session.add(topic)
        assert session.in_transaction() and topic in session.new
        assert not connections.can_autocommit(session)  # a pending insert
        session.expunge(topic)
        assert session.in_transaction()  # begun by adding, without a connection
        assert connections.can_autocommit(session)
        session.execute(text("SELECT 1"))
        assert not connections.can_autocommit(session)  # a connection in the transaction
        session.rollback()
        assert connections.can_autocommit(session)


def test_autocommit_connections_go_back_transactional(app) -> None:  # type: ignore[no-untyped-def]
    with connections.autocommit(db.engine) as conn:
        assert conn.connection.dbapi_connection.autocommit is True
    with db.engine.connect() as conn:
        assert conn.connection.dbapi_connection.autocommit is False
