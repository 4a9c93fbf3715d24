"""Two gunicorn web processes (the deploy configuration, with the gthread and, when installed,
the gevent worker): what one handles reaches sockets on the other through Redis, and the
sockets-per-recipient limit counts both."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket as net
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.inbox.conftest import assert_closed_1009, deliveries_of, padded, socket, token_for
from whistle_web.extensions import db

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).with_name("gunicorn")


def _free_port() -> int:
    with net.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(
    port: int, database_url: str, redis_url: str, worker_class: str
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "WHISTLE_ENV": "test",
        "PORT": str(port),
        "WHISTLE_BIND_HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "1",
        "WHISTLE_WEB_THREADS": "8",
        "WHISTLE_WS_MAX_SOCKETS_PER_RECIPIENT": "2",
        "WHISTLE_DB_POOL_SIZE": "3",
    }
    return subprocess.Popen(
        [
            str(GUNICORN),
            "-c",
            "gunicorn.conf.py",
            "--worker-class",
            worker_class,
            "--access-logfile",
            "/dev/null",
            "wsgi:app",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_healthy(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode()[-2000:])  # type: ignore[union-attr]
        try:
            if httpx.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{base} did not become healthy")


def _worker_classes() -> list[object]:
    gevent = pytest.mark.skipif(
        importlib.util.find_spec("gevent") is None, reason="gevent is not installed"
    )
    return ["gthread", pytest.param("gevent", marks=gevent)]


@pytest.fixture(scope="module", params=_worker_classes())
def two_servers(request, service_urls) -> Iterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """Two web processes of the given gunicorn worker class (one process each)."""
    database_url, redis_url = service_urls
    url = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    processes, bases = [], []
    try:
        for _ in range(2):
            port = _free_port()
            processes.append(_start(port, url, redis_url, request.param))
            bases.append(f"http://127.0.0.1:{port}")
        for base, process in zip(bases, processes, strict=True):
            _wait_healthy(base, process)
        yield bases[0], bases[1]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
            if process.stderr is not None:
                process.stderr.close()


def test_a_trigger_and_an_action_on_one_process_reach_sockets_on_the_other(
    two_servers, inbox, make_api, jobs
):
    a, b = two_servers
    org, ada = inbox["org"], inbox["ada"]
    api = make_api(org)
    db.session.commit()
    token = token_for(org.id, "u-1")
    with socket(a) as on_a, socket(b) as on_b:
        on_a.auth(token)
        on_b.auth(token)
        # The trigger is an HTTP request to process B; a worker sends it.
        response = httpx.post(
            f"{b}/api/v1/notifications",
            headers={"Authorization": f"Bearer {api.token}"},
            json={"template": "welcome", "to": ["u-1"], "channels": ["in_app"], "data": {}},
        )
        assert response.status_code in (200, 201, 202), response.text
        jobs()
        first_a = on_a.expect("notification")
        first_b = on_b.expect("notification")
        assert first_a == first_b and first_a["title"] == "Hello Ada"
        # Read through process B's HTTP feed: the tab on process A hears of it.
        read = httpx.post(
            f"{b}/api/v1/inbox/{first_a['id']}/read",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert read.status_code == 200, read.text
        updated = on_a.expect("updated", id=first_a["id"])
        assert updated["read_at"] and updated["seq"] > first_a["seq"]
        assert on_a.expect("unread_count")["count"] == 0
        # And an action on A's socket reaches B's.
        on_a.send({"type": "archive", "id": first_a["id"]})
        assert on_b.expect("updated", id=first_a["id"])["read_at"]  # the read, first
        assert on_b.expect("updated", id=first_a["id"])["archived_at"]
    (delivery,) = deliveries_of(org.id, ada.id)
    assert delivery.read_at and delivery.archived_at


def test_the_socket_limit_counts_every_process(two_servers, inbox):
    a, b = two_servers
    token = token_for(inbox["org"].id, "u-1")
    with socket(a) as one, socket(b) as two:
        one.auth(token)
        two.auth(token)
        with socket(a) as three:
            three.send({"type": "auth", "token": token})
            assert three.close_code()[0] == 4009


def test_messages_over_4_kib_close_1009_under_each_worker_class(two_servers, inbox):
    a, _ = two_servers
    token = token_for(inbox["org"].id, "u-1")
    over = padded(4097)
    for message in (over, [over[i : i + 1000] for i in range(0, len(over), 1000)]):
        with socket(a) as ws:
            ws.auth(token)
            assert assert_closed_1009(ws, message) == "Messages are at most 4096 bytes."
    with socket(a, max_size=None) as ws:
        ws.auth(token)
        assert assert_closed_1009(ws, padded(4 * 2**20))
    with socket(a) as ws:
        ws.auth(token)
        ws.send(padded(4096, "é", ref="fits"))
        ws.expect("ack", ref="fits")
