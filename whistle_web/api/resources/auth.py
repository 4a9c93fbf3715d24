"""Staff access tokens: ``POST /auth/token`` and ``POST /auth/refresh``."""

from __future__ import annotations

from pydantic import EmailStr, Field

from whistle_web.api import auth as api_auth
from whistle_web.api import bp
from whistle_web.api.framework import Out, Schema, endpoint


class TokenRequest(Schema):
    email: EmailStr
    password: str = Field(min_length=1, max_length=500)
    organization_id: int | None = Field(default=None, ge=1)


class RefreshRequest(Schema):
    refresh_token: str = Field(min_length=1, max_length=200)


class TokenOut(Out):
    access_token: str
    refresh_token: str
    token_type: str = "Bearer"  # noqa: S105  (the scheme name, not a secret)
    expires_in: int
    organization_id: int


@endpoint(
    bp,
    "POST",
    "/auth/token",
    summary="Exchange staff credentials for an access token",
    tags=["Auth"],
    body=TokenRequest,
    response=TokenOut,
    auth="none",
    errors=[401],
)
def create_token(body: TokenRequest) -> TokenOut:
    """The access token lasts 15 minutes and carries the staff member's role in the chosen
    organization (the first one by default). Refresh it with the refresh token."""
    return TokenOut(**api_auth.login(body.email, body.password, body.organization_id))


@endpoint(
    bp,
    "POST",
    "/auth/refresh",
    summary="Rotate a refresh token for a new token pair",
    tags=["Auth"],
    body=RefreshRequest,
    response=TokenOut,
    auth="none",
    errors=[401],
)
def refresh_token(body: RefreshRequest) -> TokenOut:
    """Each refresh token works once; using one twice revokes the whole chain."""
    return TokenOut(**api_auth.refresh(body.refresh_token))
