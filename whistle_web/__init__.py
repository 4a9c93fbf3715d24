"""Whistle: a self-hosted, multi-tenant notification platform."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask
from redis import Redis
from werkzeug.middleware.proxy_fix import ProxyFix

from whistle_web import connections, crypto, security
from whistle_web.config import PROJECT_ROOT, load_config
from whistle_web.extensions import csrf, db, htmx, login_manager, migrate, sock
from whistle_web.logs import configure_logging

log = logging.getLogger(__name__)


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the application from the environment, with ``config`` overriding it."""
    app = Flask(
        __name__,
        template_folder=str(PROJECT_ROOT / "templates"),
        static_folder=str(PROJECT_ROOT / "static"),
    )
    app.config.update(load_config())
    if config:
        app.config.update(config)
    if not app.config["TESTING"]:
        configure_logging(
            app.config["WHISTLE_LOG_LEVEL"], json_logs=app.config["WHISTLE_ENV"] == "production"
        )
    _resolve_services(app)

    crypto.configure(
        crypto.keyring_from_config(
            app.config["SECRET_KEY"],
            app.config["WHISTLE_ENCRYPTION_KEY"],
            app.config["WHISTLE_ENCRYPTION_KEYS_PREVIOUS"],
            kms_key_id=app.config["WHISTLE_KMS_KEY_ID"],
            kms_region=app.config["WHISTLE_KMS_REGION"],
            kms_endpoint_url=app.config["WHISTLE_KMS_ENDPOINT_URL"],
        )
    )
    security.configure_password_hasher(fast=app.config.get("WHISTLE_FAST_PASSWORD_HASH", False))
    proxies = app.config["WHISTLE_PROXY_FIX"]
    if proxies:  # behind a router that terminates TLS: trust its X-Forwarded-* headers
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies
        )

    db.init_app(app)
    with app.app_context():
        connections.watch(db.engine)
    from whistle_web import models  # noqa: F401  (register every table before Alembic looks)

    migrate.init_app(
        app,
        db,
        directory=str(PROJECT_ROOT / "migrations"),
        compare_type=True,
        render_as_batch=False,
    )
    login_manager.init_app(app)
    csrf.init_app(app)
    htmx.init_app(app)
    sock.init_app(app)
    app.extensions["whistle.redis"] = Redis.from_url(app.config["REDIS_URL"])

    from whistle_web import api, console, inbox, tracking, web

    web.init_app(app)
    console.init_app(app)
    api.init_app(app)
    tracking.init_app(app)
    inbox.init_app(app)

    from whistle_web.cli import whistle_cli

    app.cli.add_command(whistle_cli)
    _init_sentry(app)
    return app


def _resolve_services(app: Flask) -> None:
    """Use the configured URLs, or start (or reuse) embedded servers in development."""
    if app.config["SQLALCHEMY_DATABASE_URI"] and app.config["REDIS_URL"]:
        return
    if app.config["WHISTLE_ENV"] == "production":  # load_config already refused this
        raise RuntimeError("DATABASE_URL and REDIS_URL are required in production")
    from whistle_web.embedded import EmbeddedServices

    services = EmbeddedServices(app.config["WHISTLE_DATA_DIR"] / app.config["WHISTLE_ENV"])
    urls = services.start()
    app.config["SQLALCHEMY_DATABASE_URI"] = app.config["SQLALCHEMY_DATABASE_URI"] or urls.database
    app.config["REDIS_URL"] = app.config["REDIS_URL"] or urls.redis
    log.info("using embedded PostgreSQL and Redis under %s", services.data_dir)


def _init_sentry(app: Flask) -> None:
    dsn = app.config["SENTRY_DSN"]
    if not dsn:
        return
    import sentry_sdk
    from sentry_sdk.integrations.flask import FlaskIntegration
    from sentry_sdk.integrations.rq import RqIntegration

    secrets = [app.config["SECRET_KEY"]]

    def scrub(event: Any, hint: Any) -> Any:
        """Redact credentials anywhere in an event (messages, locals, breadcrumbs)."""
        return _scrub(event, secrets)

    sentry_sdk.init(
        dsn=dsn,
        environment=app.config["WHISTLE_ENV"],
        integrations=[FlaskIntegration(), RqIntegration()],
        traces_sample_rate=float(app.config.get("SENTRY_TRACES_SAMPLE_RATE", 0.0)),
        before_send=scrub,
        before_breadcrumb=scrub,
    )


def _scrub(value: Any, secrets: list[str]) -> Any:
    from whistle_web.logs import redact

    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "[Filtered]")
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    return value


def get_redis(app: Flask | None = None) -> Redis:
    """The application's Redis client."""
    from flask import current_app

    return (app or current_app).extensions["whistle.redis"]
