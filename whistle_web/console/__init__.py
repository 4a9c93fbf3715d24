"""The staff console: server-rendered pages with htmx."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    # widget_demo adds its pages to the console blueprint: import it before registering.
    from whistle_web.console import auth, views, widget_demo  # noqa: F401

    auth.init_login(app)
    app.register_blueprint(views.bp)
