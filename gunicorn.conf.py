"""Gunicorn settings, read from the environment a PaaS provides."""

import os

bind = f"{os.environ.get('WHISTLE_BIND_HOST', '0.0.0.0')}:{os.environ.get('PORT', '5000')}"  # noqa: S104
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# The web process serves HTTP and /ws WebSockets together (a PaaS routes one process), so it
# runs gevent: a socket is a greenlet, and one worker holds thousands of them (measured in
# bench/realtime.py; the README has the numbers). gthread would tie up one of its `threads`
# per open socket, so a few widgets would starve the API; it stays selectable for comparison.
# psycopg 3 and redis-py cooperate with gevent's monkey-patching.
worker_class = os.environ.get("WHISTLE_WEB_WORKER_CLASS", "gevent")
threads = int(os.environ.get("WHISTLE_WEB_THREADS", "16"))
# gevent: simultaneous connections (sockets included) per worker.
worker_connections = int(os.environ.get("WHISTLE_WEB_CONNECTIONS", "20000"))
timeout = 60
graceful_timeout = 20
accesslog = "-"
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    """Hide what loading the app created from the garbage collector.

    A full collection walks every tracked object: 50-100 ms over a loaded worker's
    ~100,000-160,000, during which a gevent worker answers nothing and every request in
    flight waits. Those objects live as long as the process, so they are frozen into the
    permanent generation and collections walk only what requests create: ~3 ms over
    ~12,000 (measured with a gc callback in a worker under bench/api.py's trigger load).
    """
    import gc

    gc.freeze()
