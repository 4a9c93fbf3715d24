"""``whistle dev`` (what ``make run`` starts): embedded services, demo, web, worker, scheduler."""

from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from whistle_web.demo import DEMO_EMAIL, DEMO_PASSWORD

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"whistle dev exited early with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.fixture
def dev_server(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update({"WHISTLE_DATA_DIR": str(tmp_path / "data"), "WHISTLE_ENV": "development"})
    log = open(tmp_path / "dev.log", "w+")  # noqa: SIM115
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "whistle"), "dev", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield port, process, tmp_path, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()


def test_whistle_dev_runs_the_whole_product_on_embedded_services(dev_server):
    port, process, tmp_path, log = dev_server
    base = f"http://127.0.0.1:{port}"
    _wait_for(f"{base}/login", process)

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"{base}/login").read().decode()
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode(
        {"email": DEMO_EMAIL, "password": DEMO_PASSWORD, "csrf_token": token}
    ).encode()
    dashboard = opener.open(f"{base}/login", data=form).read().decode()
    assert "Acme Cloud (demo)" in dashboard
    with opener.open(f"{base}/api/v1/health") as response:
        assert response.status == 200

    # The worker and scheduler came up beside the web process.
    deadline = time.monotonic() + 30
    output = ""
    while time.monotonic() < deadline:
        log.seek(0)
        output = log.read()
        if "worker" in output and "scheduler" in output and "Listening at" in output:
            break
        time.sleep(0.5)
    assert f"{DEMO_EMAIL} / {DEMO_PASSWORD}" in output
    assert re.search(r"worker\.1\s+\|.*Listening on", output) or "*** Listening on" in output
    assert re.search(r"scheduler\.1\s+\|", output)

    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0 or process.returncode in (-signal.SIGTERM, 130, 143)
    # The embedded servers this run started are stopped on exit; their data stays.
    assert not (tmp_path / "data" / "development" / "postgres" / "postmaster.pid").exists()
    assert (tmp_path / "data" / "development" / "postgres" / "PG_VERSION").exists()
