"""A recipient's preferences, push devices and in-app widget token."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any

from flask import request
from pydantic import Field, field_validator

from whistle_web.api import bp
from whistle_web.api.framework import Out, Schema, current_actor, endpoint, parse_body
from whistle_web.api.resources.audiences import JsonObject, Text
from whistle_web.preferences import services
from whistle_web.recipients.models import Device, DeviceKind
from whistle_web.tenancy import require_organization_id

PREFERENCES = ["Preferences"]
DEVICES = ["Devices"]


class ChannelSwitchesIn(Schema):
    """On/off per channel; `null` removes the switch (back to the default, on)."""

    email: bool | None = None
    sms: bool | None = None
    push: bool | None = None
    in_app: bool | None = None
    webhook: bool | None = None


class ChannelSwitchesOut(Out):
    email: bool
    sms: bool
    push: bool
    in_app: bool
    webhook: bool


class QuietHoursIn(Schema):
    start: time = Field(examples=["22:00"])
    end: time = Field(examples=["07:00"])

    @field_validator("start", "end")
    @classmethod
    def _local(cls, value: time) -> time:
        if value.tzinfo is not None:
            raise ValueError("A local time without an offset: the recipient's timezone applies.")
        return value


class QuietHoursOut(Out):
    start: time
    end: time


class CategoryPreferenceIn(Schema):
    key: Text = Field(min_length=1, max_length=100)
    channels: ChannelSwitchesIn = Field(default_factory=ChannelSwitchesIn)
    # Read-only fields of the GET document, accepted so it can be sent back as it is.
    name: str | None = Field(default=None, description="Ignored.")
    critical: bool | None = Field(default=None, description="Ignored.")


class CategoryPreferenceOut(Out):
    key: str
    name: str
    critical: bool
    channels: ChannelSwitchesOut


class PreferencesIn(Schema):
    unsubscribed: bool = Field(
        default=None,  # type: ignore[arg-type]
        description="true unsubscribes from everything but critical categories; false undoes it.",
    )
    quiet_hours: QuietHoursIn | None = Field(
        default=None, description="In the recipient's timezone; `null` removes them."
    )
    channels: ChannelSwitchesIn = Field(
        default=None,  # type: ignore[arg-type]
        description="Switches for every category.",
    )
    categories: list[CategoryPreferenceIn] = Field(
        default=None,  # type: ignore[arg-type]
        max_length=500,
        description="Switches per category; critical categories cannot be turned off.",
    )


class PreferencesOut(Out):
    unsubscribed: bool
    quiet_hours: QuietHoursOut | None
    channels: ChannelSwitchesOut = Field(description="Effective switches for every category.")
    categories: list[CategoryPreferenceOut] = Field(
        description="Effective switches per category (critical ones are always on)."
    )


@endpoint(
    bp,
    "GET",
    "/recipients/{external_id}/preferences",
    summary="Get a recipient's effective preferences",
    tags=PREFERENCES,
    scope="recipients:read",
    response=PreferencesOut,
)
def show_preferences(external_id: str) -> PreferencesOut:
    """Every channel is on unless switched off; the most specific switch wins
    (category and channel, category, channel, everything)."""
    return PreferencesOut.model_validate(services.get_preferences(external_id))


@endpoint(
    bp,
    "PUT",
    "/recipients/{external_id}/preferences",
    summary="Change a recipient's preferences",
    tags=PREFERENCES,
    scope="recipients:write",
    body=PreferencesIn,
    response=PreferencesOut,
)
def put_preferences(external_id: str, body: PreferencesIn) -> PreferencesOut:
    """Only what is sent changes. The document `GET` returns can be sent back as it is."""
    sent = body.model_fields_set
    quiet: Any = False
    if "quiet_hours" in sent:
        quiet = (body.quiet_hours.start, body.quiet_hours.end) if body.quiet_hours else None
    result = services.update_preferences(
        external_id,
        unsubscribed=body.unsubscribed if "unsubscribed" in sent else None,
        quiet_hours=quiet,
        channels=body.channels.model_dump(exclude_unset=True) if "channels" in sent else None,
        categories=[
            {"key": item.key, "channels": item.channels.model_dump(exclude_unset=True)}
            for item in body.categories
        ]
        if "categories" in sent
        else None,
        actor=current_actor(),
    )
    return PreferencesOut.model_validate(result)


# --- devices ----------------------------------------------------------------------------


class DeviceIn(Schema):
    kind: DeviceKind
    token: Text = Field(
        min_length=1,
        max_length=4096,
        description="FCM/APNs registration token, or the Web Push endpoint URL.",
    )
    data: JsonObject = Field(
        default_factory=dict,
        description='Web Push needs the subscription keys: `{"keys": {"p256dh", "auth"}}`.',
    )


class DeviceOut(Out):
    id: int
    kind: str
    token: str
    data: dict[str, Any]
    enabled: bool = Field(description="False once a provider reported the token invalid.")
    last_seen_at: datetime | None
    disabled_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, device: Device) -> DeviceOut:
        return cls(
            id=device.id,
            kind=device.kind.value,
            token=device.token,
            data=device.data or {},
            enabled=device.disabled_at is None,
            last_seen_at=device.last_seen_at,
            disabled_at=device.disabled_at,
            created_at=device.created_at,
            updated_at=device.updated_at,
        )


class DeviceList(Out):
    data: list[DeviceOut]


@endpoint(
    bp,
    "POST",
    "/recipients/{external_id}/devices",
    summary="Register a push device",
    tags=DEVICES,
    scope="recipients:write",
    body=DeviceIn,
    response=DeviceOut,
    status=201,
    idempotent=True,
)
def register_device(external_id: str, body: DeviceIn) -> DeviceOut:
    """Registering a token again updates it (and moves it to this recipient if another one
    had it); a device a provider disabled is enabled again."""
    device, _ = services.register_device(
        external_id, body.kind, body.token, body.data, actor=current_actor()
    )
    return DeviceOut.of(device)


@endpoint(
    bp,
    "GET",
    "/recipients/{external_id}/devices",
    summary="List a recipient's devices",
    tags=DEVICES,
    scope="recipients:read",
    response=DeviceList,
)
def list_devices(external_id: str) -> DeviceList:
    return DeviceList(data=[DeviceOut.of(d) for d in services.list_devices(external_id)])


@endpoint(
    bp,
    "DELETE",
    "/recipients/{external_id}/devices/{id}",
    summary="Remove a device",
    tags=DEVICES,
    scope="recipients:write",
    status=204,
)
def delete_device(external_id: str, id: int) -> None:
    services.delete_device(external_id, id, actor=current_actor())


# --- widget token -----------------------------------------------------------------------


class RecipientTokenIn(Schema):
    ttl_seconds: int = Field(default=3600, ge=60, le=86400)


class RecipientTokenOut(Out):
    token: str
    expires_at: datetime


@endpoint(
    bp,
    "POST",
    "/recipients/{external_id}/token",
    summary="Issue an in-app widget token for a recipient",
    tags=PREFERENCES,
    scope="recipients:write",
    response=RecipientTokenOut,
    errors=[422],
)
def issue_recipient_token(external_id: str) -> RecipientTokenOut:
    """A JWT (HS256, signed with the organization's widget secret) with `sub` = the external
    id, `org`, `aud` = `whistle-widget`, `iat` and `exp`. It lives one hour unless the
    optional JSON body `{"ttl_seconds": 60..86400}` says otherwise."""
    raw = request.get_data(cache=True)
    options = parse_body(RecipientTokenIn, raw) if raw.strip() else RecipientTokenIn()
    recipient = services.get_recipient(external_id)
    token, expires_at = services.issue_recipient_token(
        require_organization_id(),
        recipient.external_id,
        ttl=timedelta(seconds=options.ttl_seconds),
    )
    return RecipientTokenOut(token=token, expires_at=expires_at)
