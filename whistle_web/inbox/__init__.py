"""The in-app inbox: the recipient's feed, its realtime socket (/ws) and the Redis hub."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    from whistle_web.inbox.socket import MAX_FRAME_BYTES, bp

    # Larger client frames close the socket with 1009 (simple-websocket enforces it).
    app.config.setdefault("SOCK_SERVER_OPTIONS", {"max_message_size": MAX_FRAME_BYTES})
    app.register_blueprint(bp)
