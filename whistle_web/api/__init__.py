"""The JSON API for integrations, under /api/v1."""

from __future__ import annotations

from flask import Blueprint, Flask, jsonify
from sqlalchemy import text

from whistle_web.extensions import csrf, db

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.get("/health")
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


def init_app(app: Flask) -> None:
    csrf.exempt(bp)  # bearer-token API: no cookies, no CSRF
    app.register_blueprint(bp)
