"""Console sign-in: Flask-Login user loading and the organization a session works in."""

from __future__ import annotations

from flask import Flask, g, session
from flask_login import current_user

from whistle_web.accounts.models import Membership, User
from whistle_web.accounts.services import memberships_of
from whistle_web.extensions import db, login_manager
from whistle_web.organizations.models import Organization
from whistle_web.web import enter_organization

SESSION_ORG_KEY = "organization_id"


def init_login(app: Flask) -> None:
    login_manager.login_view = "console.login"
    login_manager.login_message = "Sign in to continue."
    login_manager.login_message_category = "info"
    login_manager.session_protection = "strong"
    app.before_request(_enter_session_organization)


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
    if not current_user.is_authenticated:
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
