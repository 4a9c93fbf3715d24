"""The staff console: server-rendered pages with htmx."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    from whistle_web.console import auth, views

    auth.init_login(app)
    app.register_blueprint(views.bp)
