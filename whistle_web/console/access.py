"""Who may do what in the console, and the helpers every console page uses.

Every console route is wrapped in :func:`requires` with the least action it needs; templates
call ``can('edit')`` to hide what the signed-in member may not do. Roles rank
viewer < editor < admin < owner:

- ``view``: read every page (viewer and up);
- ``edit``: change templates, segments, campaign drafts and recipients (editor and up);
- ``send``: launch, pause, resume, cancel campaigns and send tests (editor and up);
- ``manage``: providers, API keys, team, branding, operations (admin and up);
- ``own``: the organization itself (owner).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import Flask, abort, current_app, g, render_template, request
from flask_login import current_user, login_required

from whistle_web.accounts.models import Role
from whistle_web.errors import Actor
from whistle_web.extensions import htmx

ACTIONS = {
    "view": Role.VIEWER,
    "edit": Role.EDITOR,
    "send": Role.EDITOR,
    "manage": Role.ADMIN,
    "own": Role.OWNER,
}

F = TypeVar("F", bound=Callable[..., Any])


def can(action: str) -> bool:
    """Whether the signed-in member's role allows ``action`` in the current organization."""
    membership = g.get("membership")
    if membership is None or not current_user.is_authenticated:
        return False
    return Role(membership.role).rank >= ACTIONS[action].rank


def requires(action: str) -> Callable[[F], F]:
    """Sign-in, a membership of the current organization and a role allowing ``action``.

    Anonymous users go to the sign-in page; members whose role is too low get 403.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown console action {action!r}")

    def decorate(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if g.get("membership") is None:
                abort(403)
            if not can(action):
                abort(403)
            return view(*args, **kwargs)

        return login_required(wrapper)  # type: ignore[return-value]

    return decorate


def actor() -> Actor:
    """The signed-in staff member, for audit entries."""
    return Actor("user", current_user.id, current_user.email, ip_address=request.remote_addr)


def render(template: str, partial: str | None = None, status: int = 200, **context: Any) -> Any:
    """The full page, or only ``partial`` for an htmx request that is not a boosted page load.

    ``partial`` is a template (usually the page's ``_something.html`` fragment) that renders
    the part the htmx request swaps.
    """
    if partial is not None and htmx and not htmx.boosted:
        return render_template(partial, **context), status
    return render_template(template, **context), status


# The console's sections: (label, index endpoint, endpoint prefix marking the section active).
# A section whose index page is not registered is left out of the navigation.
SECTIONS = (
    ("Dashboard", "console.dashboard", "console.dashboard"),
    ("Campaigns", "console.campaigns", "console.campaign"),
    ("Segments", "console.segments", "console.segment"),
    ("Templates", "console.templates", "console.template"),
    ("Recipients", "console.recipients", "console.recipient"),
    ("Settings", "console.settings", "console.setting"),
    ("Operations", "console.operations", "console.operation"),
)


def navigation() -> list[tuple[str, str, bool]]:
    """(label, endpoint, is the current section) for each registered section."""
    current = request.endpoint or ""
    return [
        (label, endpoint, current.startswith(prefix))
        for label, endpoint, prefix in SECTIONS
        if endpoint in current_app.view_functions
    ]


def init_app(app: Flask) -> None:
    app.jinja_env.globals["can"] = can
    app.jinja_env.globals["navigation"] = navigation
