"""Gunicorn settings, read from the environment a PaaS provides."""

import os

bind = f"{os.environ.get('WHISTLE_BIND_HOST', '0.0.0.0')}:{os.environ.get('PORT', '5000')}"  # noqa: S104
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads let flask-sock hold WebSockets beside HTTP requests in one process.
worker_class = "gthread"
threads = int(os.environ.get("WHISTLE_WEB_THREADS", "16"))
timeout = 60
graceful_timeout = 20
accesslog = "-"
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
