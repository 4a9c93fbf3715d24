"""The staff console: server-rendered pages with htmx."""

from __future__ import annotations

from importlib import import_module

from flask import Flask

# Modules that add their pages to the console blueprint (``views.bp``); they are imported
# before the blueprint is registered. A new section adds its module here.
PAGE_MODULES = (
    "views",
    "widget_demo",
    "recipients",
    "account",
    "campaigns",
    "segments",
    "templates_pages",
    "settings",
    "settings_keys",
    "settings_team",
    "settings_audience",
    "settings_org",
    "operations",
    "story",
    "funnels",
)


def init_app(app: Flask) -> None:
    from whistle_web.console import access, auth, views

    for name in PAGE_MODULES:
        import_module(f"whistle_web.console.{name}")
    auth.init_login(app)
    access.init_app(app)
    app.register_blueprint(views.bp)
