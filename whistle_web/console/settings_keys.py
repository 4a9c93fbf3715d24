"""Settings: API keys. The secret is shown once, on the page that answers the creation."""

from __future__ import annotations

from typing import Any

from flask import abort, flash, g, make_response, redirect, request, url_for
from flask_login import current_user
from sqlalchemy import select

from whistle_web.accounts.models import ApiKey
from whistle_web.accounts.services import SCOPES, create_api_key, revoke_api_key
from whistle_web.console.access import actor, render, requires
from whistle_web.console.settings import errors_by_field, no_store
from whistle_web.console.views import bp
from whistle_web.errors import FieldError, NotFound, ValidationError
from whistle_web.extensions import db

SCOPE_GROUPS = (
    ("Recipients", ("recipients:read", "recipients:write")),
    ("Notifications", ("notifications:read", "notifications:write")),
    ("Campaigns", ("campaigns:read", "campaigns:write")),
    ("Templates", ("templates:read", "templates:write")),
    ("Audiences", ("audiences:read", "audiences:write")),
    ("Providers", ("providers:read", "providers:write")),
    ("API keys", ("api_keys:manage",)),
)


def _keys() -> list[ApiKey]:
    return list(
        db.session.scalars(
            select(ApiKey).order_by(ApiKey.revoked_at.is_not(None), ApiKey.id.desc())
        )
    )


def _page(
    errors: dict[str, list[str]] | None = None,
    values: dict[str, Any] | None = None,
    status: int = 200,
) -> Any:
    return render(
        "console/settings/keys.html",
        keys=_keys(),
        scope_groups=SCOPE_GROUPS,
        errors=errors or {},
        values=values or {"scopes": []},
        status=status,
    )


@bp.get("/settings/api-keys")
@requires("manage")
def settings_keys() -> Any:
    """Every key of the organization (never a secret)."""
    return _page()


@bp.post("/settings/api-keys")
@requires("manage")
def settings_key_create() -> Any:
    """Create a key and show its secret this once."""
    name = request.form.get("name", "").replace("\x00", "").strip()
    scopes = request.form.getlist("scopes")
    errors: list[FieldError] = []
    if not name:
        errors.append(FieldError("name", "Give the key a name."))
    elif len(name) > 200:
        errors.append(FieldError("name", "Use at most 200 characters."))
    if not scopes:
        errors.append(FieldError("scopes", "Choose at least one scope."))
    elif set(scopes) - set(SCOPES):
        errors.append(FieldError("scopes", "Choose scopes from the list."))
    try:
        if errors:
            raise ValidationError(errors)
        issued = create_api_key(name, scopes=scopes, actor=actor(), created_by_id=current_user.id)
        db.session.commit()
    except ValidationError as exc:
        return _page(errors_by_field(exc), {"name": name, "scopes": scopes}, 422)
    html = render(
        "console/settings/key_created.html",
        key=issued.api_key,
        secret=issued.secret,
        organization=g.organization,
        status=201,
    )
    response = make_response(*html)
    return no_store(response)


@bp.post("/settings/api-keys/<int:key_id>/revoke")
@requires("manage")
def settings_key_revoke(key_id: int) -> Any:
    """Revoke a key: its next request gets 401."""
    if not 0 < key_id < 2**63:
        abort(404)
    try:
        key = revoke_api_key(key_id, actor=actor())
    except NotFound:
        abort(404)
    db.session.commit()
    if request.headers.get("HX-Request"):
        return render("console/settings/_key_row.html", "console/settings/_key_row.html", key=key)
    flash(f"Key {key.prefix} revoked. Requests with it are refused from now on.", "info")
    return redirect(url_for("console.settings_keys"), 303)
