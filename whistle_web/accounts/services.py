"""Staff accounts, memberships and API keys."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select, update

from whistle_web import security
from whistle_web.accounts.models import ApiKey, Membership, Role, User
from whistle_web.errors import Actor, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.organizations.services import record_audit
from whistle_web.tenancy import require_organization_id, unscoped

MIN_PASSWORD_LENGTH = 10

SCOPES: tuple[str, ...] = (
    "recipients:read",
    "recipients:write",
    "notifications:read",
    "notifications:write",
    "campaigns:read",
    "campaigns:write",
    "templates:read",
    "templates:write",
    "audiences:read",
    "audiences:write",
    "providers:read",
    "providers:write",
    "api_keys:manage",
)


def normalize_email(email: str, *, field_name: str = "email") -> str:
    """Return the lower-cased, validated address.

    Raises:
        ValidationError: not an email address.
    """
    try:
        # Self-hosted teams often use internal domains (.local, .internal): accept them.
        result = validate_email(
            email.strip(), check_deliverability=False, globally_deliverable=False
        )
    except EmailNotValidError as exc:
        raise ValidationError.single(field_name, str(exc)) from None
    return result.normalized.lower()


def create_user(email: str, password: str, *, name: str = "") -> User:
    """Create a staff user; flushes, does not commit.

    Raises:
        ValidationError: bad email, short password, or the email is taken.
    """
    email = normalize_email(email)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationError.single("password", f"Use at least {MIN_PASSWORD_LENGTH} characters.")
    if db.session.scalar(select(User.id).where(User.email == email)) is not None:
        raise ValidationError.single("email", "A user with this email already exists.")
    user = User(email=email, name=name.strip(), password_hash=security.hash_password(password))
    db.session.add(user)
    db.session.flush()
    return user


def find_user_by_email(email: str) -> User | None:
    return db.session.scalar(select(User).where(User.email == email.strip().lower()))


def authenticate(email: str, password: str) -> User | None:
    """Return the active user with these credentials, else None (same cost either way)."""
    user = find_user_by_email(email)
    ok = security.verify_password(user.password_hash if user else None, password)
    if not ok or user is None or not user.is_active:
        return None
    return user


def add_member(user: User, role: Role, *, actor: Actor) -> Membership:
    """Give ``user`` a role in the current organization; flushes, does not commit."""
    membership = Membership(user_id=user.id, role=Role(role))
    db.session.add(membership)
    db.session.flush()
    record_audit(actor, "member.added", "user", user.id, {"email": user.email, "role": role})
    return membership


def memberships_of(user_id: int) -> list[Membership]:
    """Every organization a user can sign in to (read across organizations on purpose)."""
    stmt = unscoped(select(Membership).where(Membership.user_id == user_id).order_by(Membership.id))
    return list(db.session.scalars(stmt))


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    secret: str


def create_api_key(
    name: str,
    *,
    scopes: Iterable[str] | None = None,
    actor: Actor,
    created_by_id: int | None = None,
) -> IssuedKey:
    """Create an API key in the current organization; the secret is returned only here.

    Raises:
        ValidationError: empty name or an unknown scope.
    """
    require_organization_id()
    name = name.strip()
    if not name:
        raise ValidationError.single("name", "Give the key a name.")
    chosen = list(SCOPES if scopes is None else scopes)
    unknown = sorted(set(chosen) - set(SCOPES))
    if unknown:
        raise ValidationError.single("scopes", f"Unknown scope: {', '.join(unknown)}.")
    prefix, secret, secret_hash = security.new_api_key()
    key = ApiKey(
        name=name,
        prefix=prefix,
        secret_hash=secret_hash,
        scopes=sorted(set(chosen)),
        created_by_id=created_by_id,
    )
    db.session.add(key)
    db.session.flush()
    record_audit(actor, "api_key.created", "api_key", key.id, {"name": name, "prefix": prefix})
    return IssuedKey(key, secret)


def revoke_api_key(api_key_id: int, *, actor: Actor) -> ApiKey:
    """Revoke a key of the current organization at once.

    Raises:
        NotFound: no such key in this organization.
    """
    key = db.session.get(ApiKey, api_key_id)
    if key is None:
        raise NotFound("API key not found.")
    if key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        record_audit(actor, "api_key.revoked", "api_key", key.id, {"prefix": key.prefix})
    return key


def resolve_api_key(token: str) -> ApiKey | None:
    """Find the active key for a bearer token (before any organization is known)."""
    prefix = security.split_api_key(token)
    if prefix is None:
        return None
    key = db.session.scalar(unscoped(select(ApiKey).where(ApiKey.prefix == prefix)))
    if key is None or not security.api_key_matches(token, key.secret_hash):
        return None
    now = datetime.now(UTC)
    if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
        return None
    return key


def touch_api_key(api_key_id: int) -> None:
    """Record use of a key, at most once a minute per key to spare the database."""
    now = datetime.now(UTC)
    db.session.execute(
        unscoped(
            update(ApiKey)
            .where(ApiKey.id == api_key_id)
            .where((ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < now.replace(second=0)))
            .values(last_used_at=now)
        )
    )


def current_role(user_id: int) -> Role | None:
    """The user's role in the current organization, or None."""
    org_id = require_organization_id()
    return db.session.scalar(
        select(Membership.role).where(
            Membership.user_id == user_id, Membership.organization_id == org_id
        )
    )
