"""Staff accounts, memberships and API keys."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from email_validator import EmailNotValidError, validate_email
from itsdangerous import BadData, URLSafeTimedSerializer
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
    forget_api_key(key.id)
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


@dataclass(frozen=True)
class ActiveKey:
    """What a request needs of an API key, kept per process for :data:`KEY_CACHE_SECONDS`."""

    id: int
    organization_id: int
    prefix: str
    scopes: frozenset[str]
    expires_at: datetime | None
    last_used_at: datetime | None


# Every API request authenticates; reading the key row each time was a query per request.
# A revocation in this process drops the entry at once (:func:`forget_api_key`); other
# processes stop accepting the key within this many seconds.
KEY_CACHE_SECONDS = 1.0
KEY_CACHE_SIZE = 10_000
TOUCH_EVERY = timedelta(minutes=1)
_key_cache: dict[str, tuple[float, ActiveKey]] = {}


def active_api_key(token: str) -> ActiveKey | None:
    """:func:`resolve_api_key`, answered from this process's cache for up to a second.

    Unknown keys are never cached: a key just created works at once, and guessed keys
    cannot fill the cache.
    """
    if security.split_api_key(token) is None:
        return None
    digest = security.hash_api_key(token)
    now = time.monotonic()
    cached = _key_cache.get(digest)
    if cached is None or now - cached[0] > KEY_CACHE_SECONDS:
        key = resolve_api_key(token)
        if key is None:
            _key_cache.pop(digest, None)
            return None
        if len(_key_cache) >= KEY_CACHE_SIZE:
            _key_cache.clear()
        cached = (
            now,
            ActiveKey(
                id=key.id,
                organization_id=key.organization_id,
                prefix=key.prefix,
                scopes=frozenset(key.scopes),
                expires_at=key.expires_at,
                last_used_at=key.last_used_at,
            ),
        )
        _key_cache[digest] = cached
    active = cached[1]
    if active.expires_at is not None and active.expires_at <= datetime.now(UTC):
        return None
    return active


def forget_api_key(api_key_id: int) -> None:
    """Drop a key from this process's cache (it was revoked here)."""
    for digest, (_, active) in list(_key_cache.items()):
        if active.id == api_key_id:
            _key_cache.pop(digest, None)


def record_api_key_use(active: ActiveKey) -> bool:
    """Write ``last_used_at`` if it is over a minute old, at most once a minute per key
    and process, and commit it (a read-only request would otherwise roll it back).

    Returns:
        Whether it was written.
    """
    now = datetime.now(UTC)
    if active.last_used_at is not None and active.last_used_at > now - TOUCH_EVERY:
        return False
    # Mark it first: concurrent requests of this process see it and skip the write.
    fresh = replace(active, last_used_at=now)
    for digest, (loaded, cached) in list(_key_cache.items()):
        if cached.id == active.id:
            _key_cache[digest] = (loaded, fresh)
    touch_api_key(active.id)
    db.session.commit()
    return True


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


# --- passwords --------------------------------------------------------------------------

MAX_PASSWORD_LENGTH = 500
RESET_SALT = "whistle.console.password-reset"
RESET_MAX_AGE = 3600


def check_new_password(password: str, *, email: str = "", field_name: str = "password") -> None:
    """The rules every new password follows.

    Raises:
        ValidationError: too short, too long, or the email address itself.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationError.single(field_name, f"Use at least {MIN_PASSWORD_LENGTH} characters.")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValidationError.single(field_name, f"Use at most {MAX_PASSWORD_LENGTH} characters.")
    if email and password.strip().lower() == email.strip().lower():
        raise ValidationError.single(field_name, "Don't use your email address as password.")


def set_password(user: User, password: str) -> None:
    """Replace a user's password (which voids their reset links); flushes, does not commit.

    Raises:
        ValidationError: the password breaks :func:`check_new_password`.
    """
    check_new_password(password, email=user.email)
    user.password_hash = security.hash_password(password)
    db.session.flush()


def change_password(user: User, current: str, new: str) -> None:
    """Change a password knowing the current one; flushes, does not commit.

    Raises:
        ValidationError: ``current_password`` is wrong, or ``new_password`` breaks the rules.
    """
    if not security.verify_password(user.password_hash, current):
        raise ValidationError.single("current_password", "This is not your current password.")
    check_new_password(new, email=user.email, field_name="new_password")
    set_password(user, new)


def password_fingerprint(user: User) -> str:
    """Changes whenever the password does, so a reset link works until the next change."""
    return hashlib.sha256(f"{user.id}:{user.password_hash}".encode()).hexdigest()[:24]


def password_reset_token(user: User, secret_key: str) -> str:
    """A signed, purpose-salted token naming the user and their current password."""
    serializer = URLSafeTimedSerializer(secret_key, salt=RESET_SALT)
    return str(serializer.dumps({"user": user.id, "password": password_fingerprint(user)}))


def user_for_reset_token(
    token: str, secret_key: str, *, max_age: int = RESET_MAX_AGE
) -> User | None:
    """The active user a reset token is valid for: not expired, not tampered with, and
    issued for the password the user still has. None otherwise."""
    serializer = URLSafeTimedSerializer(secret_key, salt=RESET_SALT)
    try:
        claims = serializer.loads(token, max_age=max_age)
    except BadData:
        return None
    if not isinstance(claims, dict) or not isinstance(claims.get("user"), int):
        return None
    user = db.session.get(User, claims["user"])
    if user is None or not user.is_active:
        return None
    if not hmac.compare_digest(str(claims.get("password", "")), password_fingerprint(user)):
        return None
    return user
