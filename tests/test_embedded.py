"""The embedded PostgreSQL and Redis that ``make run`` uses without configured URLs."""

from __future__ import annotations

import psycopg
import redis as redis_lib
from sqlalchemy.engine import make_url

from whistle_web.embedded import EmbeddedServices


def _conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(False)


def test_servers_start_keep_data_across_restarts_and_stop(tmp_path):
    services = EmbeddedServices(tmp_path / "data")
    try:
        urls = services.start(database="whistle_embedded_test")
        with psycopg.connect(_conninfo(urls.database), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (value text)")
            conn.execute("INSERT INTO kept VALUES ('still here')")
        redis_lib.Redis.from_url(urls.redis).set("kept", "yes")

        # A second handle reuses the running servers instead of starting new ones.
        again = EmbeddedServices(tmp_path / "data").start(database="whistle_embedded_test")
        assert again == urls

        services.stop()
        assert not (tmp_path / "data" / "postgres" / "postmaster.pid").exists()
        assert not services._redis_alive(urls.redis)

        urls = services.start(database="whistle_embedded_test")
        with psycopg.connect(_conninfo(urls.database)) as conn:
            assert conn.execute("SELECT value FROM kept").fetchone() == ("still here",)
        assert redis_lib.Redis.from_url(urls.redis).get("kept") == b"yes"
    finally:
        services.stop()
