"""Settings: the team. Members and roles, invitations by emailed link, and accepting one.

Only owners make owners or change an owner, and the last owner can be neither demoted nor
removed (:mod:`whistle_web.accounts.team`). Invitations are signed links checked against
the audit log, so no table is needed; see that module for why they work once.
"""

from __future__ import annotations

from typing import Any

from flask import abort, flash, g, redirect, render_template, request, url_for
from flask_login import current_user

from whistle_web import system_mail
from whistle_web.accounts.models import Role
from whistle_web.accounts.services import MIN_PASSWORD_LENGTH, find_user_by_email
from whistle_web.accounts.team import (
    INVITATION_MAX_AGE,
    InvalidInvitation,
    NotAllowed,
    accept_invitation,
    change_role,
    invite_member,
    list_members,
    organization_name,
    pending_invitations,
    read_invitation,
    remove_member,
    revoke_invitation,
)
from whistle_web.console.access import actor, can, render, requires
from whistle_web.console.account import start_session
from whistle_web.console.settings import errors_by_field
from whistle_web.console.views import bp
from whistle_web.errors import InvalidState, NotFound, ValidationError

ROLE_HELP = {
    Role.OWNER: "everything, including the organization itself and other owners",
    Role.ADMIN: "providers, API keys, team, settings and operations",
    Role.EDITOR: "templates, segments, campaigns and recipients; can send",
    Role.VIEWER: "reads every page",
}


def acting_role() -> Role:
    return Role(g.membership.role)


def assignable_roles() -> list[Role]:
    """The roles the signed-in member may hand out (owners only make owners)."""
    roles = [Role.ADMIN, Role.EDITOR, Role.VIEWER]
    return [Role.OWNER, *roles] if acting_role() == Role.OWNER else roles


def _page(
    errors: dict[str, list[str]] | None = None,
    values: dict[str, Any] | None = None,
    status: int = 200,
    partial: bool = False,
) -> Any:
    return render(
        "console/settings/team.html",
        "console/settings/_members.html" if partial else None,
        members=list_members(),
        invitations=pending_invitations() if can("manage") else [],
        roles=assignable_roles(),
        all_roles=list(Role),
        role_help=ROLE_HELP,
        errors=errors or {},
        values=values or {"role": Role.EDITOR.value},
        me=current_user.id,
        my_role=acting_role(),
        status=status,
    )


@bp.get("/settings/team")
@requires("view")
def settings_team() -> Any:
    """The members of the organization with their roles."""
    return _page()


@bp.post("/settings/team/invite")
@requires("manage")
def settings_team_invite() -> Any:
    """Invite someone by email to join with a role."""
    email = request.form.get("email", "").replace("\x00", "").strip()
    role = request.form.get("role", "")
    values = {"email": email, "role": role}
    try:
        invitation, token = invite_member(email, role, acting_role=acting_role(), actor=actor())
    except ValidationError as exc:
        return _page(errors_by_field(exc), values, 422)
    except NotAllowed as exc:
        return _page({"role": [exc.detail]}, values, 403)
    link = url_for("console.settings_invitation_accept", token=token, _external=True)
    days = INVITATION_MAX_AGE.days
    text = (
        f"{current_user.email} invited you to join {g.organization.name} on Whistle "
        f"as {invitation.role.value}.\n\nAccept the invitation:\n{link}\n\n"
        f"The link works once and expires in {days} days. If you did not expect it, "
        "ignore this email."
    )
    # Sent by a job off the request (system_mail); without WHISTLE_MAIL_URL (development,
    # tests) the link is logged at INFO instead.
    system_mail.send(
        invitation.email,
        f"Join {g.organization.name} on Whistle",
        text,
        log_instead=f"invitation to {g.organization.name} ({invitation.role.value}): {link}",
    )
    flash(f"Invitation sent to {invitation.email}.", "info")
    return redirect(url_for("console.settings_team"), 303)


@bp.post("/settings/team/<int:user_id>/role")
@requires("manage")
def settings_team_role(user_id: int) -> Any:
    """Give a member another role."""
    try:
        membership = change_role(
            user_id, request.form.get("role", ""), acting_role=acting_role(), actor=actor()
        )
    except NotFound:
        abort(404)
    except ValidationError as exc:
        return _page(
            {f"role-{user_id}": errors_by_field(exc).get("role", [])}, status=422, partial=True
        )
    except (NotAllowed, InvalidState) as exc:
        return _page({f"role-{user_id}": [exc.detail]}, status=exc.status, partial=True)
    if request.headers.get("HX-Request"):
        return _page(partial=True)
    flash(f"Role changed to {Role(membership.role).value}.", "info")
    return redirect(url_for("console.settings_team"), 303)


@bp.post("/settings/team/<int:user_id>/remove")
@requires("manage")
def settings_team_remove(user_id: int) -> Any:
    """Take a member out of the organization."""
    try:
        remove_member(user_id, acting_role=acting_role(), actor=actor())
    except NotFound:
        abort(404)
    except (NotAllowed, InvalidState) as exc:
        return _page({f"role-{user_id}": [exc.detail]}, status=exc.status, partial=True)
    if user_id == current_user.id:
        flash("You left the organization.", "info")
        return redirect(url_for("console.dashboard"), 303)
    if request.headers.get("HX-Request"):
        return _page(partial=True)
    flash("Member removed.", "info")
    return redirect(url_for("console.settings_team"), 303)


@bp.post("/settings/team/invitations/<invitation_id>/revoke")
@requires("manage")
def settings_team_invitation_revoke(invitation_id: str) -> Any:
    """Withdraw a pending invitation: its link stops working."""
    try:
        revoke_invitation(invitation_id, actor=actor())
    except NotFound:
        abort(404)
    flash("Invitation withdrawn.", "info")
    return redirect(url_for("console.settings_team"), 303)


# Not behind ``requires``: the person invited may have no account yet. The signed token is
# the credential; an existing account also proves itself with its password.
@bp.route("/settings/invitations/<token>", methods=["GET", "POST"])
def settings_invitation_accept(token: str) -> Any:
    """Accept an invitation: set a password (new account) or confirm yours, and join."""
    try:
        invitation = read_invitation(token)
    except InvalidInvitation as exc:
        return render_template("console/settings/invitation.html", problem=exc.detail), 404
    existing = find_user_by_email(invitation.email) is not None
    context = {
        "invitation": invitation,
        "organization_name": organization_name(invitation.organization_id),
        "existing": existing,
        "min_length": MIN_PASSWORD_LENGTH,
        "problem": None,
        "errors": {},
        "name": "",
    }
    if request.method == "GET":
        return render_template("console/settings/invitation.html", **context)
    password = request.form.get("password", "")
    name = request.form.get("name", "").replace("\x00", "").strip()[:200]
    context["name"] = name
    if not existing and password != request.form.get("password_again", ""):
        context["errors"] = {"password_again": ["The two passwords differ."]}
        return render_template("console/settings/invitation.html", **context), 422
    try:
        user = accept_invitation(token, password=password, name=name)
    except ValidationError as exc:
        context["errors"] = errors_by_field(exc)
        return render_template("console/settings/invitation.html", **context), 422
    except InvalidInvitation as exc:
        return render_template("console/settings/invitation.html", problem=exc.detail), 404
    start_session(user, invitation.organization_id)
    flash(f"Welcome to {context['organization_name']}.", "info")
    return redirect(url_for("console.dashboard"), 303)
