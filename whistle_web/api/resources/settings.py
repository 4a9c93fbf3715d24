"""Settings: providers (channel integrations, credentials write-only) and API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from flask import g
from pydantic import Field
from sqlalchemy import select

from whistle_web.accounts.models import ApiKey
from whistle_web.accounts.services import SCOPES, create_api_key, revoke_api_key
from whistle_web.api import bp
from whistle_web.api.auth import Forbidden
from whistle_web.api.framework import Out, Schema, current_actor, endpoint, page
from whistle_web.api.resources.sending import JsonObject, Text
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.channels.models import Provider
from whistle_web.channels.services import (
    create_provider,
    credentials_set,
    delete_provider,
    get_provider,
    send_test_message,
    update_provider,
)
from whistle_web.extensions import db

# --- providers ---------------------------------------------------------------------------

PROVIDER_TAGS = ["Providers"]
MAX_RATE = 100_000.0


class ProviderIn(Schema):
    channel: Channel
    kind: ProviderKind
    name: Text = Field(min_length=1, max_length=200)
    config: JsonObject = Field(
        default_factory=dict,
        description="Settings and credentials in one object. Secret keys (password, "
        "auth_token, secret_access_key, access_key_id, service_account_json, "
        "vapid_private_key, signing_secret, api_key, username, and each kind's required "
        "credentials) are stored encrypted and never returned.",
        examples=[{"host": "smtp.example.com", "port": 587, "from_email": "hi@example.com"}],
    )
    rate_limit_per_second: float | None = Field(
        default=None, gt=0, le=MAX_RATE, allow_inf_nan=False
    )
    priority: int = Field(default=100, ge=0, le=1_000_000, description="Lower goes first.")
    enabled: bool = True


class ProviderPatch(Schema):
    """Only the fields sent change. `config` keys are merged: omitted keys (credentials
    included) keep their value, a null removes the key."""

    name: Text | None = Field(default=None, min_length=1, max_length=200)
    config: JsonObject | None = None
    rate_limit_per_second: float | None = Field(
        default=None, gt=0, le=MAX_RATE, allow_inf_nan=False
    )
    priority: int | None = Field(default=None, ge=0, le=1_000_000)
    enabled: bool | None = None


class ProviderOut(Out):
    id: int
    channel: str
    kind: str
    name: str
    settings: dict[str, Any]
    credentials_set: list[str] = Field(description="Names of the stored credentials.")
    rate_limit_per_second: float | None
    priority: int
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, provider: Provider) -> ProviderOut:
        return cls(
            id=provider.id,
            channel=str(provider.channel),
            kind=str(provider.kind),
            name=provider.name,
            settings=provider.settings or {},
            credentials_set=credentials_set(provider),
            rate_limit_per_second=provider.rate_limit_per_second,
            priority=provider.priority,
            enabled=provider.enabled,
            created_at=provider.created_at,
            updated_at=provider.updated_at,
        )


class ProviderPage(Out):
    data: list[ProviderOut]
    next_cursor: str | None


class ProviderListQuery(Schema):
    channel: Literal["email", "sms", "push", "in_app", "webhook"] | None = None
    limit: int = Field(default=50, ge=1, le=200)
    cursor: Text | None = None


class ProviderTestIn(Schema):
    to: Text | None = Field(
        default=None,
        max_length=2048,
        description="Email address, E.164 number, push token or Web Push endpoint, a "
        "recipient's external id (in-app); for a webhook, optionally a URL instead of its own.",
    )
    device_data: JsonObject | None = Field(
        default=None, description='Push only: device data, e.g. {"keys": {"p256dh", "auth"}}.'
    )


class ProviderTestOut(Out):
    ok: bool
    provider_message_id: str | None
    error: str | None


@endpoint(
    bp,
    "POST",
    "/providers",
    summary="Add a provider",
    tags=PROVIDER_TAGS,
    scope="providers:write",
    body=ProviderIn,
    response=ProviderOut,
    status=201,
    idempotent=True,
)
def post_provider(body: ProviderIn) -> ProviderOut:
    """The configuration is checked by the provider kind (errors at `config.<key>`); the
    `channel` must be the one the kind serves (smtp/ses: email, twilio/sns: sms,
    fcm/webpush: push, in_app, webhook)."""
    provider = create_provider(
        channel=body.channel,
        kind=body.kind,
        name=body.name,
        config=body.config,
        rate_limit_per_second=body.rate_limit_per_second,
        priority=body.priority,
        enabled=body.enabled,
        actor=current_actor(),
    )
    return ProviderOut.of(provider)


@endpoint(
    bp,
    "GET",
    "/providers",
    summary="List providers (credentials are never returned)",
    tags=PROVIDER_TAGS,
    scope="providers:read",
    query=ProviderListQuery,
    response=ProviderPage,
)
def list_providers(query: ProviderListQuery) -> ProviderPage:
    stmt = select(Provider)
    if query.channel is not None:
        stmt = stmt.where(Provider.channel == Channel(query.channel))
    rows, cursor = page(stmt, Provider.id, limit=query.limit, cursor=query.cursor)
    return ProviderPage(data=[ProviderOut.of(p) for p in rows], next_cursor=cursor)


@endpoint(
    bp,
    "GET",
    "/providers/{id}",
    summary="Get a provider",
    tags=PROVIDER_TAGS,
    scope="providers:read",
    response=ProviderOut,
)
def show_provider(id: int) -> ProviderOut:
    return ProviderOut.of(get_provider(id))


@endpoint(
    bp,
    "PATCH",
    "/providers/{id}",
    summary="Change a provider",
    tags=PROVIDER_TAGS,
    scope="providers:write",
    body=ProviderPatch,
    response=ProviderOut,
)
def patch_provider(id: int, body: ProviderPatch) -> ProviderOut:
    """Credentials are write-only: send a key to replace it, omit it to keep it. `null`
    removes a `config` key or the rate limit."""
    return ProviderOut.of(
        update_provider(id, body.model_dump(exclude_unset=True), actor=current_actor())
    )


@endpoint(
    bp,
    "DELETE",
    "/providers/{id}",
    summary="Delete a provider",
    tags=PROVIDER_TAGS,
    scope="providers:write",
    status=204,
)
def remove_provider(id: int) -> None:
    """Past deliveries keep their history; new sends use the channel's other providers."""
    delete_provider(id, actor=current_actor())


@endpoint(
    bp,
    "POST",
    "/providers/{id}/test",
    summary="Send one test message through a provider now",
    tags=PROVIDER_TAGS,
    scope="providers:write",
    body=ProviderTestIn,
    response=ProviderTestOut,
    idempotent=True,
)
def test_provider_send(id: int, body: ProviderTestIn) -> ProviderTestOut:
    """Waits for the provider at most 10 seconds. `ok: false` with the provider's `error`
    when it refused, failed or did not answer in time (the answer is still 200)."""
    outcome = send_test_message(id, body.to, device_data=body.device_data, actor=current_actor())
    return ProviderTestOut(
        ok=outcome.ok, provider_message_id=outcome.provider_message_id, error=outcome.error
    )


# --- API keys ----------------------------------------------------------------------------

KEY_TAGS = ["API keys"]
ScopeName = Literal[SCOPES]  # type: ignore[valid-type]


class ApiKeyIn(Schema):
    name: Text = Field(min_length=1, max_length=200)
    scopes: list[ScopeName] = Field(min_length=1, max_length=len(SCOPES))


class ApiKeyOut(Out):
    id: int
    name: str
    prefix: str = Field(description="The public start of the key, e.g. whk_3f9a1c2b.")
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyOut:
        return cls(
            id=key.id,
            name=key.name,
            prefix=key.prefix,
            scopes=list(key.scopes),
            created_at=key.created_at,
            last_used_at=key.last_used_at,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
        )


class ApiKeyCreated(ApiKeyOut):
    secret: str = Field(description="The whole key. Shown only in this response.")


class ApiKeyPage(Out):
    data: list[ApiKeyOut]
    next_cursor: str | None


class ApiKeyListQuery(Schema):
    limit: int = Field(default=50, ge=1, le=200)
    cursor: Text | None = None


@endpoint(
    bp,
    "GET",
    "/api-keys",
    summary="List API keys (never their secrets)",
    tags=KEY_TAGS,
    scope="api_keys:manage",
    query=ApiKeyListQuery,
    response=ApiKeyPage,
)
def list_api_keys(query: ApiKeyListQuery) -> ApiKeyPage:
    rows, cursor = page(select(ApiKey), ApiKey.id, limit=query.limit, cursor=query.cursor)
    return ApiKeyPage(data=[ApiKeyOut.of(k) for k in rows], next_cursor=cursor)


@endpoint(
    bp,
    "POST",
    "/api-keys",
    summary="Create an API key; its secret is shown once",
    tags=KEY_TAGS,
    scope="api_keys:manage",
    body=ApiKeyIn,
    response=ApiKeyCreated,
    status=201,
)
def post_api_key(body: ApiKeyIn) -> ApiKeyCreated:
    """A key can grant only scopes its creator holds (403 otherwise). Not replayed with an
    `Idempotency-Key`: a stored replay would keep the secret."""
    held = set(getattr(g, "api_scopes", ()))
    missing = sorted(set(body.scopes) - held)
    if missing:
        raise Forbidden(f"You cannot grant scopes you do not hold: {', '.join(missing)}.")
    actor = current_actor()
    issued = create_api_key(
        body.name,
        scopes=body.scopes,
        actor=actor,
        created_by_id=actor.id if actor.type == "user" else None,
    )
    db.session.commit()
    return ApiKeyCreated(**ApiKeyOut.of(issued.api_key).model_dump(), secret=issued.secret)


@endpoint(
    bp,
    "DELETE",
    "/api-keys/{id}",
    summary="Revoke an API key at once",
    tags=KEY_TAGS,
    scope="api_keys:manage",
    response=ApiKeyOut,
)
def revoke_key(id: int) -> ApiKeyOut:
    """The key gets 401 from its next request. Revoking twice changes nothing."""
    key = revoke_api_key(id, actor=current_actor())
    db.session.commit()
    return ApiKeyOut.of(key)
