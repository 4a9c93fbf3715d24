"""A live server with /ws, a real WebSocket client, and helpers to send in-app items.

The server answers from its own threads and database sessions, so these tests commit for
real (their tables are truncated afterwards).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import select, text
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from werkzeug.serving import make_server

from tests.api.conftest import make_api  # noqa: F401  (the API client fixture)
from tests.factories import SYSTEM
from tests.pipeline.conftest import CONTENT, run_jobs
from whistle_web.deliveries.models import Delivery
from whistle_web.extensions import db
from whistle_web.notifications.services import trigger
from whistle_web.preferences.services import issue_recipient_token
from whistle_web.tenancy import organization_scope

SERVED = {"live_server", "two_servers", "inbox"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.fspath).replace(os.sep, "/")
        if "tests/inbox/" in path and SERVED & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.committed)


@pytest.fixture(autouse=True)
def distinct_organization_ids(request, db) -> None:  # type: ignore[no-untyped-def]
    """Start organization ids at a random height (committed tests).

    Redis pub/sub ignores database numbers: other test runs on the same Redis publish on
    ``whistle:inbox:<org>:<recipient>`` with the same small ids; ours never collide with them.
    """
    if not request.node.get_closest_marker("committed"):
        return
    # Not the random module: test plugins may seed it, and two runs would pick alike.
    start = 10**6 + secrets.randbelow(2**31 - 10**6)
    with db.engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE organizations ALTER COLUMN id RESTART WITH {start}"))


@pytest.fixture
def live_server(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


@pytest.fixture
def jobs(redis) -> Callable[[], int]:  # type: ignore[no-untyped-def]
    return lambda: run_jobs(redis)


@pytest.fixture
def inbox(org, make_recipient, make_template):  # type: ignore[no-untyped-def]
    """An organization with a welcome template and recipients u-1 and u-2 (committed)."""
    make_template(org, "welcome", CONTENT)
    ada = make_recipient(org, "u-1", name="Ada")
    grace = make_recipient(org, "u-2", name="Grace")
    db.session.commit()
    return {"org": org, "ada": ada, "grace": grace}


def token_for(org_id: int, external_id: str, **kwargs: Any) -> str:
    return issue_recipient_token(org_id, external_id, **kwargs)[0]


def send_in_app(org_id: int, external_id: str, jobs: Callable[[], int], **data: Any) -> None:
    """Trigger the welcome template to one recipient in-app and run the workers."""
    with organization_scope(org_id):
        trigger("welcome", to=[external_id], channels=["in_app"], data=data, actor=SYSTEM)
    jobs()


def deliveries_of(org_id: int, recipient_id: int) -> list[Delivery]:
    db.session.expire_all()
    with organization_scope(org_id):
        return list(
            db.session.scalars(
                select(Delivery)
                .where(Delivery.recipient_id == recipient_id, Delivery.channel == "in_app")
                .order_by(Delivery.id)
            )
        )


@contextmanager
def socket(base_url: str, *, origin: str | None = None, **kwargs: Any) -> Iterator[Socket]:
    ws = connect(
        base_url.replace("http://", "ws://") + "/ws",
        origin=origin,  # type: ignore[arg-type]
        proxy=None,
        open_timeout=5,
        close_timeout=2,
        legacy=True,
        **kwargs,
    )
    try:
        yield Socket(ws)
    finally:
        ws.close()


class Socket:
    """A thin wrapper that speaks the protocol's JSON frames."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    def send(self, frame: dict[str, Any] | str) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def recv(self, timeout: float = 5) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=timeout))

    def auth(self, token: str, last_seq: int | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "auth", "token": token}
        if last_seq is not None:
            frame["last_seq"] = last_seq
        self.send(frame)
        ready = self.expect("ready")
        return ready

    def expect(self, kind: str, timeout: float = 5, **match: Any) -> dict[str, Any]:
        """The next frame of this type (and these values), skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} frame {match} within {timeout}s")
            frame = self.recv(timeout=left)
            if frame["type"] == kind and all(frame.get(k) == v for k, v in match.items()):
                return frame

    def frames(self, quiet: float = 0.5) -> list[dict[str, Any]]:
        """Every frame until the socket stays quiet for ``quiet`` seconds."""
        out = []
        while True:
            try:
                out.append(self.recv(timeout=quiet))
            except TimeoutError:
                return out

    def close_code(self, timeout: float = 7) -> tuple[int | None, str]:
        """Wait for the server to close the socket; its close code and reason."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.ws.recv(timeout=deadline - time.monotonic())
        except ConnectionClosed as closed:
            return (closed.rcvd.code if closed.rcvd else None), (
                closed.rcvd.reason if closed.rcvd else ""
            )
        raise AssertionError("the server kept the socket open")


def padded(size: int, char: str = "x", ref: str = "big") -> str:
    """A ``read_all`` frame of exactly ``size`` bytes of UTF-8, padded with ``char``."""
    empty = json.dumps({"type": "read_all", "ref": ref, "pad": ""}, ensure_ascii=False)
    room = size - len(empty.encode())
    width = len(char.encode())
    assert room >= 0, size
    return empty[:-2] + char * (room // width) + "x" * (room % width) + '"}'


def assert_closed_1009(ws: Socket, message: str | list[str]) -> str:
    """Send ``message`` (a list: one message in these fragments); the server closes 1009."""
    try:
        ws.ws.send(message)
    except ConnectionClosed as closed:  # the server may close before the last fragment
        assert closed.rcvd is not None and closed.rcvd.code == 1009
        return closed.rcvd.reason
    code, reason = ws.close_code()
    assert code == 1009
    return reason
