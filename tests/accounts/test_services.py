"""Staff accounts, passwords and API keys."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from tests.factories import PASSWORD, SYSTEM
from whistle_web import security
from whistle_web.accounts.models import ApiKey, Role, User
from whistle_web.accounts.services import (
    authenticate,
    create_api_key,
    create_user,
    current_role,
    memberships_of,
    resolve_api_key,
    revoke_api_key,
    touch_api_key,
)
from whistle_web.errors import NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.models import AuditLog
from whistle_web.tenancy import organization_scope


def test_passwords_are_hashed_with_argon2(make_user):
    user = make_user("Ada@Example.com")
    assert user.email == "ada@example.com"
    assert user.password_hash.startswith("$argon2")
    assert PASSWORD not in user.password_hash


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [("not-an-email", PASSWORD, "email"), ("x@example.com", "short", "password")],
)
def test_bad_user_input_names_the_field(email, password, field):
    with pytest.raises(ValidationError) as error:
        create_user(email, password)
    assert error.value.errors[0].field == field


def test_emails_are_unique_case_insensitively(make_user):
    make_user("grace@example.com")
    with pytest.raises(ValidationError, match="already exists"):
        create_user("GRACE@example.com", PASSWORD)


def test_authenticate(make_user):
    user = make_user("linus@example.com")
    assert authenticate("LINUS@example.com", PASSWORD) is user
    assert authenticate("linus@example.com", "wrong password") is None
    assert authenticate("nobody@example.com", PASSWORD) is None
    user.is_active = False
    assert authenticate("linus@example.com", PASSWORD) is None


def test_memberships_span_organizations(org, other_org, make_user):
    user = make_user(org=org, role=Role.ADMIN)
    with organization_scope(other_org.id):
        from whistle_web.accounts.services import add_member

        add_member(user, Role.VIEWER, actor=SYSTEM)
    assert {m.organization_id for m in memberships_of(user.id)} == {org.id, other_org.id}
    with organization_scope(other_org.id):
        assert current_role(user.id) == Role.VIEWER
    assert Role.ADMIN.at_least(Role.EDITOR) and not Role.VIEWER.at_least(Role.EDITOR)


def test_api_keys_store_only_a_hash_and_resolve(org):
    with organization_scope(org.id):
        issued = create_api_key("Backend", scopes=["recipients:read"], actor=SYSTEM)
    key = issued.api_key
    assert issued.secret.startswith(key.prefix + "_")
    assert issued.secret not in key.secret_hash
    assert key.secret_hash == security.hash_api_key(issued.secret)
    assert resolve_api_key(issued.secret) is key
    assert resolve_api_key(issued.secret + "x") is None
    assert resolve_api_key(key.prefix + "_" + "A" * 43) is None
    assert resolve_api_key("garbage") is None
    assert resolve_api_key("") is None


def test_revoked_keys_stop_working_at_once_and_are_audited(org):
    with organization_scope(org.id):
        issued = create_api_key("Backend", actor=SYSTEM)
        revoke_api_key(issued.api_key.id, actor=SYSTEM)
        actions = db.session.scalars(select(AuditLog.action).order_by(AuditLog.id)).all()
    assert resolve_api_key(issued.secret) is None
    assert actions == ["api_key.created", "api_key.revoked"]


def test_revoking_a_foreign_key_is_not_found(org, other_org):
    with organization_scope(other_org.id):
        issued = create_api_key("Theirs", actor=SYSTEM)
    with organization_scope(org.id), pytest.raises(NotFound):
        revoke_api_key(issued.api_key.id, actor=SYSTEM)
    assert issued.api_key.revoked_at is None


def test_unknown_scopes_and_empty_names_are_refused(org):
    with organization_scope(org.id):
        with pytest.raises(ValidationError, match="Unknown scope"):
            create_api_key("k", scopes=["everything"], actor=SYSTEM)
        with pytest.raises(ValidationError, match="name"):
            create_api_key("  ", actor=SYSTEM)


def test_last_used_is_recorded(org):
    with organization_scope(org.id):
        issued = create_api_key("Backend", actor=SYSTEM)
    touch_api_key(issued.api_key.id)
    db.session.expire_all()
    with organization_scope(org.id):
        key = db.session.get(ApiKey, issued.api_key.id)
        assert key.last_used_at is not None


def test_users_are_not_tenant_rows(make_user):
    # Staff users exist across organizations; reading them needs no scope.
    user = make_user()
    assert db.session.scalar(select(User).where(User.id == user.id)) is user
