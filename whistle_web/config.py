"""Configuration read from environment variables only (12-factor).

Console sign-in and the platform's own mail:

- ``WHISTLE_MAIL_URL``: the SMTP server for the platform's own mail (password resets), as
  ``smtp://user:password@host:port`` (plain, port 25 by default), ``smtp+starttls://...``
  (STARTTLS, port 587) or ``smtp+ssl://...`` / ``smtps://...`` (implicit TLS, port 465);
  the user and password are percent-encoded. Unset in development or test, the reset link is
  logged at INFO instead (never a password); unset in production, nothing is sent and a
  warning is logged.
- ``WHISTLE_MAIL_FROM``: the sender of that mail (``Whistle <no-reply@example.com>``).
- ``WHISTLE_LOGIN_RATE_LIMIT``: failed sign-ins allowed per address and per email
  (``10 per 15 minutes``); password reset requests have the same budget.
- ``WHISTLE_SESSION_HOURS``: the longest a console session lasts; ``WHISTLE_SESSION_IDLE_MINUTES``
  ends it sooner after that long without a request (60).
- ``WHISTLE_PROXY_FIX``: how many proxies in front of the app set ``X-Forwarded-For``,
  ``-Proto`` and ``-Host`` (1 in production, 0 elsewhere); with it, HSTS and Secure cookies
  work behind a PaaS router that terminates TLS.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The development default is deliberately recognisable so production can refuse it.
DEV_SECRET_KEY = "dev-insecure-secret-key-change-me"  # noqa: S105
MIN_SECRET_KEY_LENGTH = 32
ENVIRONMENTS = ("development", "test", "production")
MAIL_SCHEMES = ("smtp://", "smtp+starttls://", "smtp+ssl://", "smtps://")


class ConfigError(RuntimeError):
    """Raised when the environment does not describe a runnable configuration."""


def normalize_database_url(url: str) -> str:
    """Make a PaaS-style ``postgres://`` URL use SQLAlchemy's psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _bool(value: str | None, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def load_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Build the Flask configuration from ``environ`` (``os.environ`` by default).

    Raises:
        ConfigError: production mode without a real ``SECRET_KEY``, database or Redis.
    """
    env = os.environ if environ is None else environ
    whistle_env = env.get("WHISTLE_ENV", "development").strip().lower()
    if whistle_env not in ENVIRONMENTS:
        raise ConfigError(
            f"WHISTLE_ENV must be one of {', '.join(ENVIRONMENTS)}, not {whistle_env!r}"
        )
    production = whistle_env == "production"

    secret_key = env.get("SECRET_KEY", "")
    if production:
        if not secret_key or secret_key == DEV_SECRET_KEY:
            raise ConfigError("SECRET_KEY must be set to a random value in production")
        if len(secret_key) < MIN_SECRET_KEY_LENGTH:
            raise ConfigError(
                f"SECRET_KEY must be at least {MIN_SECRET_KEY_LENGTH} characters in production"
            )
        for name in ("DATABASE_URL", "REDIS_URL"):
            if not env.get(name):
                raise ConfigError(f"{name} must be set in production")
    secret_key = secret_key or DEV_SECRET_KEY

    mail_url = env.get("WHISTLE_MAIL_URL", "").strip()
    if mail_url and not mail_url.startswith(MAIL_SCHEMES):
        raise ConfigError(
            "WHISTLE_MAIL_URL must look like smtp[+starttls|+ssl]://user:password@host:port"
        )

    database_url = env.get("DATABASE_URL", "")
    data_dir = Path(env.get("WHISTLE_DATA_DIR") or PROJECT_ROOT / ".data")

    return {
        "WHISTLE_ENV": whistle_env,
        "TESTING": whistle_env == "test",
        "SECRET_KEY": secret_key,
        "SQLALCHEMY_DATABASE_URI": normalize_database_url(database_url) if database_url else "",
        "SQLALCHEMY_ENGINE_OPTIONS": {
            # Checked at checkout by whistle_web.connections, without pool_pre_ping's trip.
            "pool_pre_ping": False,
            # Connections kept open per process. A gevent web worker serves many requests
            # at once: with fewer kept than in flight, each overflow connection is opened
            # and closed per request (a new PostgreSQL backend each time).
            "pool_size": int(env.get("WHISTLE_DB_POOL_SIZE", "20")),
        },
        "REDIS_URL": env.get("REDIS_URL", ""),
        "SENTRY_DSN": env.get("SENTRY_DSN", ""),
        "WHISTLE_DATA_DIR": data_dir,
        "WHISTLE_BASE_URL": env.get("WHISTLE_BASE_URL", "http://127.0.0.1:5000").rstrip("/"),
        # A base64 32-byte key for provider credentials; derived from SECRET_KEY when unset.
        "WHISTLE_ENCRYPTION_KEY": env.get("WHISTLE_ENCRYPTION_KEY", ""),
        "WHISTLE_KMS_KEY_ID": env.get("WHISTLE_KMS_KEY_ID", ""),
        "WHISTLE_KMS_REGION": env.get("WHISTLE_KMS_REGION", "us-east-1"),
        "WHISTLE_KMS_ENDPOINT_URL": env.get("WHISTLE_KMS_ENDPOINT_URL", ""),
        # Older master keys (comma-separated base64) still accepted for decryption.
        "WHISTLE_ENCRYPTION_KEYS_PREVIOUS": env.get("WHISTLE_ENCRYPTION_KEYS_PREVIOUS", ""),
        "WHISTLE_API_RATE_LIMIT": env.get("WHISTLE_API_RATE_LIMIT", "1200 per minute"),
        # Open /ws sockets one recipient may hold across all web processes (4009 beyond it).
        "WHISTLE_WS_MAX_SOCKETS_PER_RECIPIENT": int(
            env.get("WHISTLE_WS_MAX_SOCKETS_PER_RECIPIENT", "10")
        ),
        # Request bodies larger than this are refused with 413.
        "MAX_CONTENT_LENGTH": int(env.get("WHISTLE_MAX_BODY_BYTES", str(2 * 1024 * 1024))),
        # Silence after which the sweeper treats a batch's worker as dead.
        "WHISTLE_SWEEP_STALE_SECONDS": float(env.get("WHISTLE_SWEEP_STALE_SECONDS", "120")),
        # Age before the sweeper looks at new work (its creator enqueues it first).
        "WHISTLE_SWEEP_GRACE_SECONDS": float(env.get("WHISTLE_SWEEP_GRACE_SECONDS", "30")),
        "WHISTLE_EVENT_RETENTION_DAYS": int(env.get("WHISTLE_EVENT_RETENTION_DAYS", "400")),
        # Where SNS signing certificates and subscription confirmations may be fetched from.
        "WHISTLE_SNS_CERT_URL_PATTERN": env.get(
            "WHISTLE_SNS_CERT_URL_PATTERN", r"^https://sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/"
        ),
        "WHISTLE_SNS_SUBSCRIBE_URL_PATTERN": env.get(
            "WHISTLE_SNS_SUBSCRIBE_URL_PATTERN",
            r"^https://sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/",
        ),
        # Let webhook providers reach private networks (only for self-hosted internal targets).
        "WHISTLE_WEBHOOK_ALLOW_PRIVATE": _bool(env.get("WHISTLE_WEBHOOK_ALLOW_PRIVATE")),
        "WHISTLE_LOG_LEVEL": env.get("WHISTLE_LOG_LEVEL", "INFO").upper(),
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SESSION_COOKIE_SECURE": production or _bool(env.get("WHISTLE_SECURE_COOKIES")),
        "REMEMBER_COOKIE_HTTPONLY": True,
        "REMEMBER_COOKIE_SECURE": production or _bool(env.get("WHISTLE_SECURE_COOKIES")),
        "PERMANENT_SESSION_LIFETIME": int(env.get("WHISTLE_SESSION_HOURS", "12")) * 3600,
        "WHISTLE_SESSION_IDLE_MINUTES": int(env.get("WHISTLE_SESSION_IDLE_MINUTES", "60")),
        "WHISTLE_LOGIN_RATE_LIMIT": env.get("WHISTLE_LOGIN_RATE_LIMIT", "10 per 15 minutes"),
        "WHISTLE_MAIL_URL": mail_url,
        "WHISTLE_MAIL_FROM": env.get("WHISTLE_MAIL_FROM", "Whistle <no-reply@localhost>"),
        "WHISTLE_PROXY_FIX": int(env.get("WHISTLE_PROXY_FIX") or ("1" if production else "0")),
        "WTF_CSRF_TIME_LIMIT": None,
        "PREFERRED_URL_SCHEME": "https" if production else "http",
    }
