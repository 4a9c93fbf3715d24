"""The in-app inbox: the recipient's feed, its realtime socket (/ws) and the Redis hub."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    from whistle_web.inbox.socket import bp

    app.register_blueprint(bp)
