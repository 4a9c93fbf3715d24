"""First-run setup: an organization with its owner and an API key."""

from __future__ import annotations

from typing import Any

from whistle_web import security
from whistle_web.accounts.models import Role
from whistle_web.accounts.services import (
    add_member,
    create_api_key,
    create_user,
    find_user_by_email,
    normalize_email,
)
from whistle_web.errors import Actor, ValidationError
from whistle_web.extensions import db
from whistle_web.organizations.services import create_organization
from whistle_web.tenancy import organization_scope


def bootstrap(org_name: str, email: str, password: str, *, owner_name: str = "") -> dict[str, Any]:
    """Create an organization, its owner and an API key.

    An existing user becomes the owner when the password matches theirs.

    Everything is committed together or not at all.

    Raises:
        ValidationError: a bad name, email or password, or the organization exists.
    """
    try:
        org = create_organization(org_name)
        user = find_user_by_email(normalize_email(email))
        if user is None:
            user = create_user(email, password, name=owner_name)
        elif not security.verify_password(user.password_hash, password):
            raise ValidationError.single(
                "password", "This user already exists and the password does not match."
            )
        actor = Actor("system", None, "whistle bootstrap")
        with organization_scope(org.id):
            add_member(user, Role.OWNER, actor=actor)
            issued = create_api_key("Bootstrap key", actor=actor, created_by_id=user.id)
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    return {
        "organization_id": org.id,
        "organization_slug": org.slug,
        "user_id": user.id,
        "email": user.email,
        "api_key": issued.secret,
        "api_key_prefix": issued.api_key.prefix,
    }
