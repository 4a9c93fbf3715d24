"""The JSON API for integrations, under /api/v1, documented at /api/schema/."""

from __future__ import annotations

import hashlib

from flask import Blueprint, Flask, current_app, jsonify, request
from flask_limiter import HeaderNames, Limiter
from flask_limiter.util import get_remote_address
from sqlalchemy import text

from whistle_web.extensions import csrf, db

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def rate_limit_key() -> str:
    """One budget per credential (API key prefix, or a hash of the token), else per address."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        if token.startswith("whk_"):
            return f"key:{token[:14]}"
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:24]
    return f"ip:{get_remote_address()}"


limiter = Limiter(
    key_func=rate_limit_key,
    headers_enabled=True,
    # The IETF draft's names: RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset.
    header_name_mapping={
        HeaderNames.LIMIT: "RateLimit-Limit",
        HeaderNames.REMAINING: "RateLimit-Remaining",
        HeaderNames.RESET: "RateLimit-Reset",
        HeaderNames.RETRY_AFTER: "Retry-After",
    },
    strategy="moving-window",
    key_prefix="whistle:ratelimit:api",
)


@bp.get("/health")
@limiter.exempt
def health():  # type: ignore[no-untyped-def]
    """Report whether PostgreSQL and Redis answer; used by load balancers and benchmarks."""
    from whistle_web import get_redis

    checks: dict[str, str] = {}
    try:
        db.session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # report, don't crash, when the database is down
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    healthy = all(v == "ok" for v in checks.values())
    return jsonify(status="ok" if healthy else "degraded", checks=checks), 200 if healthy else 503


def limits_storage_uri(redis_url: str) -> str:
    """The `limits` library spells a Redis Unix socket ``redis+unix://``."""
    if redis_url.startswith("unix://"):
        return "redis+unix://" + redis_url.removeprefix("unix://")
    return redis_url


_blueprint_limited = False


def init_app(app: Flask) -> None:
    from whistle_web.api import resources  # noqa: F401  (registers every endpoint on bp)
    from whistle_web.api.openapi import schema_bp
    from whistle_web.api.ratelimit import OneTripMovingWindow

    app.config.setdefault("RATELIMIT_STORAGE_URI", limits_storage_uri(app.config["REDIS_URL"]))
    app.config.setdefault("RATELIMIT_ENABLED", True)
    limiter.init_app(app)
    # init_app builds the strategy from `strategy="moving-window"`: swap in the same window
    # counted in one Redis round trip instead of two (Redis storage only).
    if hasattr(limiter._storage, "get_connection"):
        limiter._limiter = OneTripMovingWindow(limiter._storage)
    global _blueprint_limited
    if not _blueprint_limited:  # the limiter is module-level: a second app must not add a
        # second limit (each would record every hit again)
        limiter.limit(
            lambda: current_app.config["WHISTLE_API_RATE_LIMIT"],
            # ``@limiter.exempt`` does not lift a limit set on the whole blueprint: a load
            # balancer's checks must never share (or spend) a budget.
            exempt_when=lambda: request.endpoint == "api.health",
        )(bp)
        _blueprint_limited = True
    csrf.exempt(bp)  # bearer-token API: no cookies, no CSRF
    app.register_blueprint(bp)
    app.register_blueprint(schema_bp)
