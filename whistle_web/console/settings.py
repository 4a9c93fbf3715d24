"""Settings: the overview and the providers of each channel.

Providers are listed per channel in failover order (moved up and down with htmx), added and
edited with the fields of their kind, enabled and disabled, given a rate limit, tested with
a message to an address the admin types, and deleted. Credentials are write-only: a page
only ever says whether one is set, and an empty credential field keeps the stored value.

Reading the list is harmless (viewer and up); every change needs ``manage`` (admin and up).
Other settings pages live in ``settings_keys``, ``settings_team``, ``settings_audience`` and
``settings_org``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from flask import abort, flash, redirect, request, url_for
from werkzeug.wrappers import Response

from whistle_web.channels.base import provider_class
from whistle_web.channels.kinds import PROVIDER_CHANNEL, Channel, ProviderKind
from whistle_web.channels.models import Provider
from whistle_web.channels.services import (
    create_provider,
    credentials_set,
    delete_provider,
    get_provider,
    move_provider,
    providers_by_channel,
    secret_keys,
    send_test_message,
    update_provider,
)
from whistle_web.console.access import actor, render, requires
from whistle_web.console.views import bp
from whistle_web.errors import DomainError, FieldError, NotFound, ValidationError
from whistle_web.extensions import htmx

MAX_RATE = 100_000.0
MAX_FIELD_LENGTH = 20_000

CHANNEL_LABELS = {
    Channel.EMAIL: "Email",
    Channel.SMS: "SMS",
    Channel.PUSH: "Push",
    Channel.IN_APP: "In-app",
    Channel.WEBHOOK: "Webhook",
}
KIND_LABELS = {
    ProviderKind.SMTP: "SMTP",
    ProviderKind.SES: "Amazon SES",
    ProviderKind.TWILIO: "Twilio",
    ProviderKind.SNS: "Amazon SNS",
    ProviderKind.FCM: "Firebase Cloud Messaging",
    ProviderKind.WEBPUSH: "Web Push (VAPID)",
    ProviderKind.IN_APP: "In-app (Whistle's own)",
    ProviderKind.WEBHOOK: "Signed webhook",
}
TEST_ADDRESS_HINT = {
    Channel.EMAIL: "an email address",
    Channel.SMS: "a phone number in E.164 format (+14155550100)",
    Channel.PUSH: "a device token or Web Push endpoint",
    Channel.IN_APP: "a recipient's external id",
    Channel.WEBHOOK: "a URL to post to instead of the provider's own (optional)",
}


@dataclass(frozen=True)
class ConfigField:
    key: str
    label: str
    type: str = "text"  # text | int | float | bool | choice | textarea
    choices: tuple[str, ...] = ()
    help: str = ""


# The configuration each kind reads. Which of them are required comes from the provider
# class (required_settings / required_credentials, checked by its validate()); which are
# secrets from channels.services.secret_keys().
KIND_FIELDS: dict[ProviderKind, tuple[ConfigField, ...]] = {
    ProviderKind.SMTP: (
        ConfigField("host", "Host"),
        ConfigField("port", "Port", "int", help="587 (STARTTLS) or 465 (TLS) usually."),
        ConfigField("use_tls", "TLS", "choice", ("", "starttls", "ssl", "none")),
        ConfigField("from_email", "From email"),
        ConfigField("from_name", "From name"),
        ConfigField("timeout", "Timeout (seconds)", "float"),
        ConfigField("username", "Username"),
        ConfigField("password", "Password"),
    ),
    ProviderKind.SES: (
        ConfigField("region", "Region", help="e.g. eu-west-1"),
        ConfigField("from_email", "From email"),
        ConfigField("from_name", "From name"),
        ConfigField("configuration_set", "Configuration set"),
        ConfigField("endpoint_url", "Endpoint URL", help="Only for SES-compatible services."),
        ConfigField("timeout", "Timeout (seconds)", "float"),
        ConfigField("access_key_id", "Access key id"),
        ConfigField("secret_access_key", "Secret access key"),
        ConfigField("session_token", "Session token"),
    ),
    ProviderKind.TWILIO: (
        ConfigField("from_number", "From number", help="E.164, or use a messaging service."),
        ConfigField("messaging_service_sid", "Messaging service SID"),
        ConfigField("status_callback_url", "Status callback URL"),
        ConfigField("base_url", "API base URL"),
        ConfigField("timeout", "Timeout (seconds)", "float"),
        ConfigField("account_sid", "Account SID"),
        ConfigField("auth_token", "Auth token"),
    ),
    ProviderKind.SNS: (
        ConfigField("region", "Region"),
        ConfigField("sms_type", "SMS type", "choice", ("", "Transactional", "Promotional")),
        ConfigField("sender_id", "Sender id"),
        ConfigField("endpoint_url", "Endpoint URL"),
        ConfigField("access_key_id", "Access key id"),
        ConfigField("secret_access_key", "Secret access key"),
    ),
    ProviderKind.FCM: (
        ConfigField("project_id", "Project id"),
        ConfigField("base_url", "API base URL"),
        ConfigField("token_uri", "Token URI"),
        ConfigField("timeout", "Timeout (seconds)", "float"),
        ConfigField("service_account_json", "Service account JSON", "textarea"),
    ),
    ProviderKind.WEBPUSH: (
        ConfigField("vapid_subject", "VAPID subject", help="mailto: or https: contact."),
        ConfigField("ttl", "Time to live (seconds)", "int"),
        ConfigField("timeout", "Timeout (seconds)", "float"),
        ConfigField("vapid_private_key", "VAPID private key", "textarea"),
    ),
    ProviderKind.IN_APP: (),
    ProviderKind.WEBHOOK: (
        ConfigField("url", "URL"),
        ConfigField("timeout", "Timeout (seconds)", "float"),
        ConfigField(
            "allow_private_networks",
            "Allow private network addresses",
            "bool",
            help="Only for internal targets of a self-hosted install.",
        ),
        ConfigField("signing_secret", "Signing secret"),
    ),
}


@dataclass(frozen=True)
class FieldView:
    """A configuration field as a form shows it (never with a credential's value)."""

    field: ConfigField
    secret: bool
    required: bool
    value: Any
    is_set: bool


def errors_by_field(exc: ValidationError) -> dict[str, list[str]]:
    """Field name -> messages, for re-rendering a form."""
    errors: dict[str, list[str]] = {}
    for error in exc.errors:
        errors.setdefault(error.field, []).append(error.message)
    return errors


def field_views(
    kind: ProviderKind, values: dict[str, Any], provider: Provider | None
) -> list[FieldView]:
    secrets = secret_keys(kind)
    impl = provider_class(kind)
    required = set(impl.required_settings) | set(impl.required_credentials)
    stored = set(credentials_set(provider)) if provider is not None else set()
    views = []
    for spec in KIND_FIELDS[kind]:
        secret = spec.key in secrets
        views.append(
            FieldView(
                field=spec,
                secret=secret,
                required=spec.key in required,
                # A credential's value never goes back into a page, not even the one typed.
                value=None if secret else values.get(spec.key),
                is_set=spec.key in stored,
            )
        )
    return views


def _typed(spec: ConfigField, raw: str) -> Any:
    """The form's text as the provider expects it; text that does not parse stays text so
    the provider's own validation names the field."""
    if spec.type == "int" and raw.strip().lstrip("-").isdigit():
        return int(raw)
    if spec.type == "float":
        try:
            number = float(raw)
        except ValueError:
            return raw
        return number if math.isfinite(number) else raw
    return raw


def read_config(
    kind: ProviderKind, provider: Provider | None
) -> tuple[dict[str, Any], list[FieldError]]:
    """The posted configuration: blank settings are left out (removed on edit), blank
    credentials are left out (kept on edit)."""
    secrets = secret_keys(kind)
    config: dict[str, Any] = {}
    errors: list[FieldError] = []
    for spec in KIND_FIELDS[kind]:
        name = f"config.{spec.key}"
        if spec.type == "bool":
            config[spec.key] = request.form.get(name) == "on"
            continue
        raw = request.form.get(name, "")
        if "\x00" in raw or len(raw) > MAX_FIELD_LENGTH:
            errors.append(FieldError(name, "This value is not allowed."))
            continue
        if spec.key not in secrets:
            raw = raw.strip()
        if raw == "":
            if provider is not None and spec.key not in secrets and spec.key in provider.settings:
                config[spec.key] = None
            continue
        if spec.type == "choice" and raw not in spec.choices:
            errors.append(
                FieldError(name, f"Choose one of {', '.join(c for c in spec.choices if c)}.")
            )
            continue
        config[spec.key] = _typed(spec, raw)
    return config, errors


def read_rate_limit() -> tuple[float | None, list[FieldError]]:
    raw = request.form.get("rate_limit_per_second", "").strip()
    if not raw:
        return None, []
    try:
        rate = float(raw)
    except ValueError:
        rate = math.nan
    if not math.isfinite(rate) or not 0 < rate <= MAX_RATE:
        return None, [
            FieldError(
                "rate_limit_per_second", f"A number of messages per second, at most {MAX_RATE:g}."
            )
        ]
    return rate, []


def _provider_or_404(provider_id: int) -> Provider:
    try:
        return get_provider(provider_id)
    except NotFound:
        abort(404)


def _kind_or_none(value: str | None) -> ProviderKind | None:
    try:
        return ProviderKind(value or "")
    except ValueError:
        return None


# --- pages ---------------------------------------------------------------------------------


@bp.get("/settings")
@requires("view")
def settings() -> Any:
    """The settings overview: what each page is for."""
    return render("console/settings/index.html")


@bp.get("/settings/providers")
@requires("view")
def settings_providers() -> Any:
    """Providers per channel, in failover order."""
    return render(
        "console/settings/providers.html",
        grouped=providers_by_channel(),
        channel_labels=CHANNEL_LABELS,
        kind_labels=KIND_LABELS,
    )


def _form_page(
    *,
    kind: ProviderKind | None,
    provider: Provider | None,
    values: dict[str, Any],
    errors: dict[str, list[str]],
    status: int = 200,
    **extra: Any,
) -> Any:
    context = {
        "kind": kind,
        "provider": provider,
        "values": values,
        "errors": errors,
        "fields": field_views(kind, values.get("config", {}), provider) if kind else [],
        "kinds": [(k, KIND_LABELS[k], CHANNEL_LABELS[PROVIDER_CHANNEL[k]]) for k in ProviderKind],
        "channel_labels": CHANNEL_LABELS,
        "kind_labels": KIND_LABELS,
        "test_hint": TEST_ADDRESS_HINT[PROVIDER_CHANNEL[kind]] if kind else "",
        "to": "",
        "device_data": "",
        "test_errors": {},
        "outcome": None,
        **extra,
    }
    return render(
        "console/settings/provider_form.html",
        "console/settings/_provider_fields.html",
        status=status,
        **context,
    )


@bp.route("/settings/providers/new", methods=["GET", "POST"])
@requires("manage")
def settings_provider_new() -> Any:
    """Add a provider: choose the kind, then fill in its fields."""
    kind = _kind_or_none(request.values.get("kind"))
    if request.method == "GET":
        if request.args.get("kind") and kind is None:
            return _form_page(
                kind=None, provider=None, values={}, errors={"kind": ["Choose a kind."]}, status=422
            )
        return _form_page(kind=kind, provider=None, values={"enabled": True}, errors={})
    if kind is None:
        return _form_page(
            kind=None, provider=None, values={}, errors={"kind": ["Choose a kind."]}, status=422
        )
    name = request.form.get("name", "").replace("\x00", "")
    config, errors = read_config(kind, None)
    rate, rate_errors = read_rate_limit()
    errors += rate_errors
    if len(name) > 200:
        errors.append(FieldError("name", "Use at most 200 characters."))
    values = {
        "name": name,
        "config": config,
        "rate_limit_per_second": request.form.get("rate_limit_per_second", ""),
        "enabled": request.form.get("enabled") == "on",
    }
    try:
        if errors:
            raise ValidationError(errors)
        provider = create_provider(
            channel=PROVIDER_CHANNEL[kind],
            kind=kind,
            name=name,
            config=config,
            rate_limit_per_second=rate,
            priority=_next_priority(PROVIDER_CHANNEL[kind]),
            enabled=values["enabled"],
            actor=actor(),
        )
    except ValidationError as exc:
        return _form_page(
            kind=kind, provider=None, values=values, errors=errors_by_field(exc), status=422
        )
    flash(f"Provider {provider.name} added.", "info")
    return redirect(url_for("console.settings_provider_edit", provider_id=provider.id), 303)


def _next_priority(channel: Channel) -> int:
    """After the channel's last provider: a new one is the last to fail over to."""
    existing = providers_by_channel()[channel]
    return max((p.priority for p in existing), default=0) + 10


def _stored_values(provider: Provider) -> dict[str, Any]:
    rate = provider.rate_limit_per_second
    return {
        "name": provider.name,
        "config": dict(provider.settings or {}),
        "rate_limit_per_second": "" if rate is None else f"{rate:g}",
        "enabled": provider.enabled,
    }


@bp.route("/settings/providers/<int:provider_id>", methods=["GET", "POST"])
@requires("manage")
def settings_provider_edit(provider_id: int) -> Any:
    """Change a provider; empty credential fields keep what is stored."""
    provider = _provider_or_404(provider_id)
    kind = ProviderKind(provider.kind)
    if request.method == "GET":
        return _form_page(kind=kind, provider=provider, values=_stored_values(provider), errors={})
    name = request.form.get("name", "").replace("\x00", "")
    config, errors = read_config(kind, provider)
    rate, rate_errors = read_rate_limit()
    errors += rate_errors
    if len(name) > 200:
        errors.append(FieldError("name", "Use at most 200 characters."))
    values = {
        "name": name,
        "config": {k: v for k, v in config.items() if v is not None},
        "rate_limit_per_second": request.form.get("rate_limit_per_second", ""),
        "enabled": request.form.get("enabled") == "on",
    }
    try:
        if errors:
            raise ValidationError(errors)
        update_provider(
            provider.id,
            {
                "name": name,
                "config": config,
                "rate_limit_per_second": rate,
                "enabled": values["enabled"],
            },
            actor=actor(),
        )
    except ValidationError as exc:
        return _form_page(
            kind=kind, provider=provider, values=values, errors=errors_by_field(exc), status=422
        )
    flash(f"Provider {name.strip()} saved.", "info")
    return redirect(url_for("console.settings_provider_edit", provider_id=provider.id), 303)


def _channel_fragment(channel: Channel) -> Any:
    return render(
        "console/settings/providers.html",
        "console/settings/_channel.html",
        channel=channel,
        providers=providers_by_channel()[channel],
        grouped=providers_by_channel(),
        channel_labels=CHANNEL_LABELS,
        kind_labels=KIND_LABELS,
    )


def _back_to_list(channel: Channel) -> Any:
    if htmx:
        return _channel_fragment(channel)
    return redirect(url_for("console.settings_providers", _anchor=f"channel-{channel.value}"), 303)


@bp.post("/settings/providers/<int:provider_id>/move")
@requires("manage")
def settings_provider_move(provider_id: int) -> Any:
    """Move a provider one place earlier (``direction=up``) or later in failover."""
    provider = _provider_or_404(provider_id)
    direction = request.form.get("direction")
    if direction not in ("up", "down"):
        abort(422)
    move_provider(provider.id, -1 if direction == "up" else 1, actor=actor())
    return _back_to_list(Channel(provider.channel))


@bp.post("/settings/providers/<int:provider_id>/toggle")
@requires("manage")
def settings_provider_toggle(provider_id: int) -> Any:
    """Enable a disabled provider or disable an enabled one."""
    provider = _provider_or_404(provider_id)
    update_provider(provider.id, {"enabled": not provider.enabled}, actor=actor())
    return _back_to_list(Channel(provider.channel))


@bp.post("/settings/providers/<int:provider_id>/delete")
@requires("manage")
def settings_provider_delete(provider_id: int) -> Any:
    """Delete a provider (past deliveries keep their history)."""
    provider = _provider_or_404(provider_id)
    channel = Channel(provider.channel)
    name = provider.name
    delete_provider(provider.id, actor=actor())
    if htmx:
        return _channel_fragment(channel)
    flash(f"Provider {name} deleted.", "info")
    return redirect(url_for("console.settings_providers"), 303)


@bp.post("/settings/providers/<int:provider_id>/test")
@requires("manage")
def settings_provider_test(provider_id: int) -> Any:
    """Send one test message now to the address typed; show what the provider said."""
    provider = _provider_or_404(provider_id)
    to = request.form.get("to", "")
    errors: dict[str, list[str]] = {}
    outcome = None
    status = 200
    device_data, device_error = _device_data(provider)
    if "\x00" in to or len(to) > 2048:
        errors = {"to": ["This address is not allowed."]}
        status = 422
    elif device_error:
        errors = {"device_data": [device_error]}
        status = 422
    else:
        try:
            outcome = send_test_message(provider.id, to, device_data=device_data, actor=actor())
        except ValidationError as exc:
            errors, status = errors_by_field(exc), 422
        except DomainError as exc:
            errors, status = {"to": [exc.detail]}, exc.status
    context = {
        "provider": provider,
        "to": to,
        "device_data": request.form.get("device_data", ""),
        "test_errors": errors,
        "outcome": outcome,
    }
    if htmx:
        return render(
            "console/settings/_provider_test.html",
            "console/settings/_provider_test.html",
            status=status,
            **context,
        )
    return _form_page(
        kind=ProviderKind(provider.kind),
        provider=provider,
        values=_stored_values(provider),
        errors={},
        status=status,
        **{k: v for k, v in context.items() if k != "provider"},
    )


def _device_data(provider: Provider) -> tuple[dict[str, Any] | None, str | None]:
    """Push only: the device data typed as JSON (a Web Push subscription's keys)."""
    raw = request.form.get("device_data", "").strip()
    if Channel(provider.channel) != Channel.PUSH or not raw:
        return None, None
    try:
        data = json.loads(raw) if len(raw) <= MAX_FIELD_LENGTH and "\x00" not in raw else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return None, 'Paste a JSON object, e.g. {"keys": {"p256dh": "...", "auth": "..."}}.'
    return data, None


def no_store(response: Response) -> Response:
    """Keep a page out of every cache (it shows a secret once)."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response
