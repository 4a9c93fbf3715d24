"""Request plumbing shared by the console and the API: tenancy, headers, error pages."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, flash, g, redirect, render_template, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from flask_wtf.csrf import CSRFError

from whistle_web import tenancy

CONSOLE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'self'; "
    "object-src 'none'"
)


class ConsoleSessions(SecureCookieSessionInterface):
    """The signed cookie session belongs to the console: the API never opens it.

    An API request authenticates with its bearer credential alone, so it gets Flask's null
    session: a console cookie sent along is not even decoded, and the answer never sets
    (or refreshes) one.
    """

    def open_session(self, app: Flask, request: Any) -> SecureCookieSession | None:
        if request.path.startswith("/api/"):
            return None  # Flask substitutes its null session and saves nothing
        return super().open_session(app, request)


def init_app(app: Flask) -> None:
    app.session_interface = ConsoleSessions()
    app.teardown_request(_leave_organization)
    app.after_request(_security_headers)
    app.register_error_handler(CSRFError, _csrf_failed)
    for code in (400, 403, 404, 405, 413, 429, 500):
        app.register_error_handler(code, _error_page)


def enter_organization(organization_id: int) -> None:
    """Scope the rest of this request to one organization (undone at teardown)."""
    g.whistle_tenant_token = tenancy.activate(organization_id)


def _leave_organization(exc: BaseException | None) -> None:
    token = g.pop("whistle_tenant_token", None)
    if token is not None:
        tenancy.deactivate(token)


def _security_headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "strict-origin-when-cross-origin")
    headers.setdefault("X-Frame-Options", "DENY")
    if response.mimetype == "text/html":
        headers.setdefault("Content-Security-Policy", CONSOLE_CSP)
    if request.is_secure:
        headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
    return response


def _csrf_failed(error: CSRFError) -> Response | tuple[str, int]:
    """An expired or missing form token: send the person back to the form, with a reason."""
    if request.method == "POST" and not request.headers.get("HX-Request"):
        flash("The form expired. Please submit it again.", "error")
        return redirect(request.full_path.rstrip("?"), code=303)
    return _error_page(error)


def _retry_after() -> int:
    """Seconds until the breached API rate limit lets a request through again."""
    import math
    import time

    from whistle_web.api import limiter

    current = limiter.current_limit
    if current is None:
        return 1
    return max(1, math.ceil(current.reset_at - time.time()))


def _error_page(error: Exception) -> tuple[str, int] | Response:
    code = getattr(error, "code", 500) or 500
    if request.path.startswith("/api/"):
        from whistle_web.api.problems import problem

        response = problem(code, getattr(error, "description", None))
        if code == 429:
            response.headers["Retry-After"] = str(_retry_after())
        return response
    return render_template("errors/error.html", code=code, error=error), code
