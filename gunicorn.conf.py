"""Gunicorn settings, read from the environment a PaaS provides."""

import os

bind = f"{os.environ.get('WHISTLE_BIND_HOST', '0.0.0.0')}:{os.environ.get('PORT', '5000')}"  # noqa: S104
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# The web process serves HTTP and /ws WebSockets together. gthread holds one thread per open
# socket (at most `threads` sockets per worker); gevent holds thousands per worker.
worker_class = os.environ.get("WHISTLE_WEB_WORKER_CLASS", "gthread")
threads = int(os.environ.get("WHISTLE_WEB_THREADS", "16"))
# gevent: simultaneous connections (sockets included) per worker.
worker_connections = int(os.environ.get("WHISTLE_WEB_CONNECTIONS", "20000"))
timeout = 60
graceful_timeout = 20
accesslog = "-"
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
