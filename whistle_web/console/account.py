"""The signed-in person's account: sign-in limits, password reset by mail, password change,
and switching between the organizations they belong to."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from flask import (
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import current_user, login_required, login_user
from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import select

from whistle_web import system_mail
from whistle_web.accounts import services as accounts
from whistle_web.accounts.models import User
from whistle_web.console.access import requires
from whistle_web.console.auth import SESSION_ORG_KEY, choose_organization, reset_session
from whistle_web.console.forms import (
    ChangePasswordForm,
    ForgotPasswordForm,
    ResetPasswordForm,
    SwitchOrganizationForm,
)
from whistle_web.console.views import bp
from whistle_web.errors import ValidationError
from whistle_web.extensions import db
from whistle_web.organizations.models import Organization

log = logging.getLogger(__name__)

RESET_SENT = (
    "If an account uses that address, we have sent it a link to choose a new password. "
    "The link works for one hour."
)
# Session keys: when it started, the last request, and the password it was opened with.
SESSION_SINCE, SESSION_SEEN, SESSION_PASSWORD = "since", "seen", "pw"


# --- sign-in limits ---------------------------------------------------------------------


def _limiter() -> tuple[MovingWindowRateLimiter, RateLimitItem]:
    limiter = current_app.extensions.get("whistle.console_limiter")
    if limiter is None:
        storage = storage_from_string(current_app.config["RATELIMIT_STORAGE_URI"])
        limiter = current_app.extensions["whistle.console_limiter"] = MovingWindowRateLimiter(
            storage
        )
    return limiter, parse(current_app.config["WHISTLE_LOGIN_RATE_LIMIT"])


def _keys(kind: str, email: str) -> list[tuple[str, ...]]:
    """One budget per client address and one per email address (hashed: no addresses in
    Redis), so neither spraying one password over many accounts nor one account from many
    addresses gets far."""
    digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    return [
        ("whistle:console", kind, "ip", request.remote_addr or "-"),
        ("whistle:console", kind, "email", digest),
    ]


def login_allowed(email: str) -> bool:
    """Whether a sign-in may be tried (failed attempts are within both budgets)."""
    limiter, item = _limiter()
    return all(limiter.test(item, *key) for key in _keys("login", email))


def record_login_failure(email: str) -> None:
    limiter, item = _limiter()
    for key in _keys("login", email):
        limiter.hit(item, *key)


def reset_request_allowed(email: str) -> bool:
    """Count a reset request; False once the address or the email asked too often."""
    limiter, item = _limiter()
    return all([limiter.hit(item, *key) for key in _keys("reset", email)])


# --- sessions ---------------------------------------------------------------------------


def start_session(user: User, organization_id: int) -> None:
    """Sign ``user`` in to a fresh, permanent session working in ``organization_id``."""
    reset_session()
    session[SESSION_ORG_KEY] = organization_id
    login_user(user)
    session.permanent = True
    now = time.time()
    session[SESSION_SINCE] = session[SESSION_SEEN] = now
    session[SESSION_PASSWORD] = accounts.password_fingerprint(user)


def session_ended(user: User) -> str | None:
    """Why the signed-in session is over (idle too long, too old, password changed), or None.

    Marks the request as seen otherwise (at most once a minute, to spare cookie writes).
    """
    now = time.time()
    config = current_app.config
    since = session.get(SESSION_SINCE)
    seen = session.get(SESSION_SEEN)
    if not isinstance(since, int | float) or not isinstance(seen, int | float):
        return "expired"  # a session from before these keys existed
    if now - seen > config["WHISTLE_SESSION_IDLE_MINUTES"] * 60:
        return "idle"
    if now - since > _seconds(config["PERMANENT_SESSION_LIFETIME"]):
        return "expired"
    if session.get(SESSION_PASSWORD) != accounts.password_fingerprint(user):
        return "password"
    if now - seen > 60:
        session[SESSION_SEEN] = now
    return None


def _seconds(lifetime: Any) -> float:
    return lifetime.total_seconds() if hasattr(lifetime, "total_seconds") else float(lifetime)


def organizations_of_current_user() -> list[tuple[int, str]]:
    """(id, name) of every organization the signed-in user belongs to, by name."""
    if not current_user.is_authenticated:
        return []
    if "account_organizations" not in g:
        ids = [m.organization_id for m in accounts.memberships_of(current_user.id)]
        rows = db.session.execute(
            select(Organization.id, Organization.name)
            .where(Organization.id.in_(ids))
            .order_by(Organization.name, Organization.id)
        ).all()
        g.account_organizations = [(int(i), str(name)) for i, name in rows]
    return list(g.account_organizations)


# --- password reset ---------------------------------------------------------------------


def _reset_link(user: User) -> str:
    """An absolute link on the configured base URL (never the request's Host header, which
    a client controls)."""
    token = accounts.password_reset_token(user, current_app.config["SECRET_KEY"])
    path = url_for("console.password_reset", token=token, _external=False)
    return current_app.config["WHISTLE_BASE_URL"] + path


def _send_reset(user: User) -> None:
    link = _reset_link(user)
    text = (
        "Someone, hopefully you, asked to reset the password of your Whistle account "
        f"{user.email}.\n\nChoose a new password here (the link works for one hour, once):\n"
        f"{link}\n\nIf you did not ask for this, ignore this message: your password stays "
        "as it is.\n"
    )
    system_mail.send(
        user.email, "Reset your Whistle password", text, log_instead=f"password reset link {link}"
    )


@bp.route("/password/forgot", methods=["GET", "POST"])
def password_forgot():  # type: ignore[no-untyped-def]
    form = ForgotPasswordForm()
    if form.validate_on_submit():
        email = (form.email.data or "").strip().lower()
        if reset_request_allowed(email):
            user = accounts.find_user_by_email(email)
            if user is not None and user.is_active and accounts.memberships_of(user.id):
                _send_reset(user)
        # The same answer whether or not the address has an account.
        flash(RESET_SENT, "info")
        return redirect(url_for("console.login"), code=303)
    status = 422 if form.errors else 200
    return render_template("console/account/forgot.html", form=form), status


@bp.route("/password/reset/<token>", methods=["GET", "POST"])
def password_reset(token: str):  # type: ignore[no-untyped-def]
    user = accounts.user_for_reset_token(token[:1000], current_app.config["SECRET_KEY"])
    if user is None:
        return render_template("console/account/reset_invalid.html"), 400
    form = ResetPasswordForm()
    if form.validate_on_submit():
        try:
            accounts.set_password(user, form.password.data or "")
        except ValidationError as exc:
            form.password.errors = [e.message for e in exc.errors]
        else:
            db.session.commit()
            log.info("password reset for user %s", user.id)
            flash("Your password is changed. Sign in with it.", "info")
            return redirect(url_for("console.login"), code=303)
    status = 422 if form.errors else 200
    return render_template("console/account/reset.html", form=form, email=user.email), status


# --- the account page -------------------------------------------------------------------


def _account_page(form: ChangePasswordForm, status: int = 200) -> Any:
    memberships = {m.organization_id: m.role for m in accounts.memberships_of(current_user.id)}
    organizations = [
        (org_id, name, memberships.get(org_id)) for org_id, name in organizations_of_current_user()
    ]
    return render_template(
        "console/account/account.html", form=form, organizations=organizations
    ), status


@bp.get("/account")
@requires("view")
def account():  # type: ignore[no-untyped-def]
    return _account_page(ChangePasswordForm())


@bp.post("/account/password")
@requires("view")
def account_password():  # type: ignore[no-untyped-def]
    form = ChangePasswordForm()
    if form.validate_on_submit():
        try:
            accounts.change_password(
                current_user, form.current_password.data or "", form.new_password.data or ""
            )
        except ValidationError as exc:
            for error in exc.errors:
                field = getattr(form, error.field, form.new_password)
                field.errors = [*field.errors, error.message]
        else:
            db.session.commit()
            # Other sessions end (their fingerprint is stale); this one goes on.
            session[SESSION_PASSWORD] = accounts.password_fingerprint(current_user)
            log.info("password changed by user %s", current_user.id)
            flash("Your password is changed.", "info")
            return redirect(url_for("console.account"), code=303)
    return _account_page(form, 422)


@bp.post("/account/organization")
@login_required
def account_organization():  # type: ignore[no-untyped-def]
    form = SwitchOrganizationForm()
    if not form.validate_on_submit() or form.organization_id.data is None:
        abort(404)
    membership = choose_organization(current_user, form.organization_id.data)
    if membership is None:
        abort(404)  # not one of the user's organizations: as if it did not exist
    return redirect(url_for("console.dashboard"), code=303)
