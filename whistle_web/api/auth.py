"""API authentication: organization API keys and staff access tokens (JWT with rotation).

``Authorization: Bearer whk_...`` is an API key: its organization and scopes apply.
Any other bearer token is a staff access token from ``POST /api/v1/auth/token``: the
staff member's role in that organization decides the scopes, checked on every request so
a demotion or removal takes effect at once.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from flask import current_app, g, request
from sqlalchemy import select, update

from whistle_web.accounts.models import Membership, Role, User
from whistle_web.accounts.services import SCOPES, active_api_key, record_api_key_use
from whistle_web.accounts.services import authenticate as check_password
from whistle_web.api.models import RefreshToken
from whistle_web.errors import Actor, DomainError
from whistle_web.extensions import db
from whistle_web.tenancy import organization_scope, unscoped
from whistle_web.web import enter_organization

ACCESS_TTL = timedelta(minutes=15)
REFRESH_TTL = timedelta(days=30)
AUDIENCE = "whistle-api"
READ_SCOPES = tuple(s for s in SCOPES if s.endswith(":read"))
ROLE_SCOPES: dict[Role, frozenset[str]] = {
    Role.VIEWER: frozenset(READ_SCOPES),
    Role.EDITOR: frozenset(SCOPES) - {"providers:write", "api_keys:manage"},
    Role.ADMIN: frozenset(SCOPES),
    Role.OWNER: frozenset(SCOPES),
}


class Unauthorized(DomainError):
    status = 401
    title = "Unauthorized"


class Forbidden(DomainError):
    status = 403
    title = "Forbidden"


def _client_ip() -> str | None:
    return request.remote_addr


def authenticate(scope: str | None) -> Actor:
    """Resolve the bearer credential, check the scope, enter the organization.

    Raises:
        Unauthorized: no credential, or a bad, expired or revoked one.
        Forbidden: the credential lacks ``scope``.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Send an API key or access token as 'Authorization: Bearer <token>'.")
    if token.startswith("whk_"):
        key = active_api_key(token)
        if key is None:
            raise Unauthorized("The API key is unknown, revoked or expired.")
        scopes, org_id = key.scopes, key.organization_id
        actor = Actor("api_key", key.id, f"API key {key.prefix}", _client_ip())
        g.api_key_id = key.id
        # At most once a minute: no write on the hot path of every request.
        record_api_key_use(key)
    else:
        claims = decode_access_token(token)
        org_id = int(claims["org"])
        role = db.session.scalar(
            unscoped(
                select(Membership.role).where(
                    Membership.user_id == int(claims["sub"]),
                    Membership.organization_id == org_id,
                )
            )
        )
        user = db.session.get(User, int(claims["sub"]))
        if role is None or user is None or not user.is_active:
            raise Unauthorized("This access token's user no longer has access.")
        scopes = set(ROLE_SCOPES[Role(role)])
        actor = Actor("user", user.id, user.email, _client_ip())
    if scope is not None and scope not in scopes:
        raise Forbidden(f"This credential lacks the '{scope}' scope.")
    g.api_actor = actor
    g.api_scopes = scopes
    g.api_rate_key = f"key:{getattr(g, 'api_key_id', None) or actor.id}:{actor.type}"
    enter_organization(org_id)
    return actor


def authenticate_recipient() -> None:
    """Resolve a recipient token (the in-app widget's), enter its organization.

    The inbox owner is left in ``g.inbox_owner`` for the view.

    Raises:
        Unauthorized: no token, or a bad or expired one, or one naming no recipient.
    """
    from whistle_web.inbox.services import authenticate as authenticate_inbox
    from whistle_web.preferences.services import InvalidRecipientToken

    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Send the recipient token as 'Authorization: Bearer <token>'.")
    try:
        owner, _claims = authenticate_inbox(token)
    except InvalidRecipientToken as error:
        raise Unauthorized(error.detail) from None
    g.inbox_owner = owner
    g.api_actor = Actor("recipient", owner.recipient_id, "recipient (widget)", _client_ip())
    g.api_scopes = set()
    enter_organization(owner.organization_id)


def _secret() -> str:
    return current_app.config["SECRET_KEY"]


def issue_access_token(user_id: int, organization_id: int, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    claims = {
        "sub": str(user_id),
        "org": organization_id,
        "aud": AUDIENCE,
        "typ": "access",
        "iat": int(now.timestamp()),
        "exp": int((now + ACCESS_TTL).timestamp()),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, _secret(), algorithm="HS256")


def decode_access_token(token: str) -> dict[str, Any]:
    try:
        claims = jwt.decode(
            token,
            _secret(),
            algorithms=["HS256"],
            audience=AUDIENCE,
            options={"require": ["exp", "sub", "org", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("The access token expired; refresh it.") from None
    except jwt.PyJWTError:
        raise Unauthorized("The access token is not valid.") from None
    if claims.get("typ") != "access":
        raise Unauthorized("The access token is not valid.")
    return claims


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _new_refresh(user_id: int, organization_id: int, family: str) -> str:
    token = "whr_" + secrets.token_urlsafe(32)
    db.session.add(
        RefreshToken(
            user_id=user_id,
            organization_id=organization_id,
            family=family,
            token_hash=_hash(token),
            expires_at=datetime.now(UTC) + REFRESH_TTL,
        )
    )
    return token


def login(email: str, password: str, organization_id: int | None) -> dict[str, Any]:
    """Exchange staff credentials for an access token and a refresh token. Commits."""
    user = check_password(email, password)
    if user is None:
        raise Unauthorized("Email or password is incorrect.")
    memberships = db.session.scalars(
        unscoped(select(Membership).where(Membership.user_id == user.id).order_by(Membership.id))
    ).all()
    chosen = next(
        (m for m in memberships if organization_id is None or m.organization_id == organization_id),
        None,
    )
    if chosen is None:
        raise Unauthorized("Email or password is incorrect.")
    with organization_scope(chosen.organization_id):
        refresh = _new_refresh(user.id, chosen.organization_id, uuid.uuid4().hex)
        db.session.commit()
    return _token_response(user.id, chosen.organization_id, refresh)


def refresh(token: str) -> dict[str, Any]:
    """Rotate a refresh token: the old one stops working, a new pair is returned. Commits.

    Presenting a refresh token that was already rotated means it leaked: the whole family
    is revoked and the caller must sign in again.
    """
    now = datetime.now(UTC)
    row = db.session.scalar(
        unscoped(
            select(RefreshToken).where(RefreshToken.token_hash == _hash(token))
        ).with_for_update()
    )
    if row is None or row.expires_at <= now:
        raise Unauthorized("The refresh token is not valid.")
    if row.revoked_at is not None:
        db.session.execute(
            unscoped(
                update(RefreshToken)
                .where(RefreshToken.family == row.family, RefreshToken.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        )
        db.session.commit()
        raise Unauthorized("This refresh token was already used; sign in again.")
    with organization_scope(row.organization_id):
        row.revoked_at = now
        new = _new_refresh(row.user_id, row.organization_id, row.family)
        db.session.commit()
    return _token_response(row.user_id, row.organization_id, new)


def _token_response(user_id: int, organization_id: int, refresh_token: str) -> dict[str, Any]:
    return {
        "access_token": issue_access_token(user_id, organization_id),
        "refresh_token": refresh_token,
        "token_type": "Bearer",
        "expires_in": int(ACCESS_TTL.total_seconds()),
        "organization_id": organization_id,
    }
