"""Settings: the organization's name, sender defaults, widget origins and signing secret."""

from __future__ import annotations

from typing import Any

from flask import flash, g, make_response, redirect, request, url_for

from whistle_web.console.access import actor, render, requires
from whistle_web.console.settings import errors_by_field, no_store
from whistle_web.console.views import bp
from whistle_web.errors import ValidationError
from whistle_web.organizations.services import rotate_widget_secret, update_organization

ROTATE_CONFIRMATION = "rotate"


def _values() -> dict[str, Any]:
    organization = g.organization
    sender = (organization.settings or {}).get("sender") or {}
    return {
        "name": organization.name,
        "from_name": sender.get("from_name", ""),
        "from_email": sender.get("from_email", ""),
        "allowed_origins": "\n".join(organization.allowed_origins or []),
    }


def _page(
    values: dict[str, Any], errors: dict[str, list[str]] | None = None, status: int = 200
) -> Any:
    return render(
        "console/settings/organization.html",
        values=values,
        errors=errors or {},
        has_secret=bool(g.organization.widget_secret_encrypted),
        confirmation=ROTATE_CONFIRMATION,
        status=status,
    )


@bp.get("/settings/organization")
@requires("view")
def settings_organization() -> Any:
    """Name, sender defaults and the origins allowed to embed the widget."""
    return _page(_values())


@bp.post("/settings/organization")
@requires("manage")
def settings_organization_save() -> Any:
    """Save the name, sender defaults and allowed origins."""
    values = {
        "name": request.form.get("name", "").replace("\x00", ""),
        "from_name": request.form.get("from_name", "").replace("\x00", ""),
        "from_email": request.form.get("from_email", "").replace("\x00", ""),
        "allowed_origins": request.form.get("allowed_origins", ""),
    }
    origins = [line.strip() for line in values["allowed_origins"].splitlines() if line.strip()]
    try:
        update_organization(
            name=values["name"],
            sender={"from_name": values["from_name"], "from_email": values["from_email"]},
            allowed_origins=origins,
            actor=actor(),
        )
    except ValidationError as exc:
        errors = errors_by_field(exc)
        for key in list(errors):
            if key.startswith("allowed_origins["):
                errors.setdefault("allowed_origins", []).extend(errors.pop(key))
        return _page(values, errors, 422)
    flash("Organization settings saved.", "info")
    return redirect(url_for("console.settings_organization"), 303)


@bp.post("/settings/organization/widget-secret")
@requires("manage")
def settings_widget_secret_rotate() -> Any:
    """Replace the widget signing secret, once the admin typed the confirmation word."""
    if request.form.get("confirm", "").strip().lower() != ROTATE_CONFIRMATION:
        return _page(_values(), {"confirm": [f"Type {ROTATE_CONFIRMATION} to confirm."]}, 422)
    secret = rotate_widget_secret(actor=actor())
    page = render("console/settings/widget_secret.html", secret=secret)
    return no_store(make_response(*page))
