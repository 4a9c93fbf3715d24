"""Console sign-in: Flask-Login user loading and the organization a session works in."""

from __future__ import annotations

from flask import Flask, Response, flash, g, redirect, request, session, url_for
from flask_login import current_user, logout_user

from whistle_web.accounts.models import Membership, User
from whistle_web.accounts.services import memberships_of
from whistle_web.extensions import db, login_manager
from whistle_web.organizations.models import Organization
from whistle_web.web import enter_organization

SESSION_ORG_KEY = "organization_id"
# What survives when a sign-in or sign-out replaces the session: the form token (open
# forms in other tabs keep working) and pending flash messages.
SESSION_KEEP = ("csrf_token", "_flashes")


def reset_session() -> None:
    """Drop everything the session holds but :data:`SESSION_KEEP`."""
    kept = {key: session[key] for key in SESSION_KEEP if key in session}
    session.clear()
    session.update(kept)


def init_login(app: Flask) -> None:
    login_manager.login_view = "console.login"
    login_manager.login_message = "Sign in to continue."
    login_manager.login_message_category = "info"
    login_manager.session_protection = "strong"
    app.before_request(_end_expired_session)
    app.before_request(_enter_session_organization)
    app.jinja_env.globals["account_organizations"] = _account_organizations


def _account_organizations() -> list[tuple[int, str]]:
    from whistle_web.console.account import organizations_of_current_user

    return organizations_of_current_user()


EXPIRED_MESSAGES = {
    "idle": "Your session expired after a while without activity. Sign in again.",
    "expired": "Your session expired. Sign in again.",
    "password": "Your password was changed. Sign in with the new one.",
}


def _end_expired_session() -> Response | None:
    """Sign out a console session that sat idle, got too old, or outlived its password."""
    if request.blueprint != "console" or not current_user.is_authenticated:
        return None
    from whistle_web.console.account import session_ended

    reason = session_ended(current_user)
    if reason is None:
        return None
    logout_user()
    reset_session()
    flash(EXPIRED_MESSAGES[reason], "info")
    target = url_for("console.login")
    if request.method == "GET" and request.endpoint != "console.logout":
        target = url_for("console.login", next=request.full_path.rstrip("?"))
    if request.headers.get("HX-Request"):
        return Response(status=204, headers={"HX-Redirect": target})
    return redirect(target, code=303)


@login_manager.user_loader
def _load_user(user_id: str) -> User | None:
    if not user_id.isdigit():
        return None
    user = db.session.get(User, int(user_id))
    return user if user is not None and user.is_active else None


def choose_organization(user: User, organization_id: int | None = None) -> Membership | None:
    """Pick the organization a user works in: the one asked for, else their first."""
    memberships = memberships_of(user.id)
    for membership in memberships:
        if organization_id is None or membership.organization_id == organization_id:
            session[SESSION_ORG_KEY] = membership.organization_id
            return membership
    return None


def _enter_session_organization() -> None:
    # The API authenticates its bearer credential and enters that organization itself: a
    # console cookie sent along must not scope an API request (nor cost it a user load).
    if request.blueprint == "api" or not current_user.is_authenticated:
        return
    membership = next(
        (
            m
            for m in memberships_of(current_user.id)
            if m.organization_id == session.get(SESSION_ORG_KEY)
        ),
        None,
    ) or choose_organization(current_user)
    g.membership = membership
    g.organization = None
    if membership is not None:
        g.organization = db.session.get(Organization, membership.organization_id)
        enter_organization(membership.organization_id)
