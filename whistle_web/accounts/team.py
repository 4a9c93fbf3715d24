"""The team of an organization: members, their roles, and invitations by emailed link.

Invitations need no table of their own. An invitation is a signed, time-limited token
(``itsdangerous`` with the app's ``SECRET_KEY``) carrying the organization, the email, the
role and a random invitation id; the audit log (append-only, tenant-scoped) records it being
issued (``member.invited``), accepted (``invitation.accepted``) or revoked
(``invitation.revoked``), with the invitation id as the target. A token is honoured only if
its signature and age are good, no accepted/revoked entry names its id and the email is not
a member yet: it works once, even if the member is removed later, and the membership's
unique (user, organization) constraint settles two acceptances racing each other.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import current_app
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import exists, func, select
from sqlalchemy.exc import IntegrityError

from whistle_web import security
from whistle_web.accounts.models import Membership, Role, User
from whistle_web.accounts.services import (
    add_member,
    create_user,
    find_user_by_email,
    normalize_email,
)
from whistle_web.errors import Actor, DomainError, InvalidState, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.organizations.models import AuditLog, Organization
from whistle_web.organizations.services import record_audit
from whistle_web.tenancy import organization_scope, require_organization_id

INVITATION_MAX_AGE = timedelta(days=7)
INVITATION_SALT = "whistle.invitation"
CLOSED = ("invitation.accepted", "invitation.revoked")


class NotAllowed(DomainError):
    """The acting member's role does not allow this change."""

    status = 403
    title = "Forbidden"


class InvalidInvitation(DomainError):
    """The invitation link is broken, expired, used or revoked."""

    status = 404
    title = "Invitation not valid"


@dataclass(frozen=True)
class Invitation:
    id: str
    organization_id: int
    email: str
    role: Role
    issued_at: datetime | None = None
    invited_by: str = ""

    @property
    def expires_at(self) -> datetime | None:
        return None if self.issued_at is None else self.issued_at + INVITATION_MAX_AGE


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=INVITATION_SALT)


# --- members -----------------------------------------------------------------------------


def list_members() -> list[tuple[Membership, User]]:
    """The current organization's members with their users, owners first."""
    rank = {role: -role.rank for role in Role}
    rows = db.session.execute(
        select(Membership, User).join(User, User.id == Membership.user_id).order_by(User.email)
    ).all()
    return sorted(((m, u) for m, u in rows), key=lambda row: rank[Role(row[0].role)])


def get_membership(user_id: int) -> Membership:
    """Raises NotFound: the user is not a member of the current organization."""
    membership = None
    if 0 < user_id < 2**63:
        membership = db.session.scalar(select(Membership).where(Membership.user_id == user_id))
    if membership is None:
        raise NotFound("No such member.")
    return membership


def _owner_ids_locked() -> list[int]:
    """The owners' user ids, their rows locked until the commit (two owners demoting each
    other at the same moment must not leave none)."""
    return list(
        db.session.scalars(
            select(Membership.user_id).where(Membership.role == Role.OWNER).with_for_update()
        )
    )


def _check_may_touch(membership: Membership, new_role: Role | None, acting_role: Role) -> None:
    touches_owner = Role(membership.role) == Role.OWNER or new_role == Role.OWNER
    if touches_owner and acting_role != Role.OWNER:
        raise NotAllowed("Only an owner can make owners or change an owner.")
    if not acting_role.at_least(Role.ADMIN):
        raise NotAllowed("Only admins and owners manage the team.")


def change_role(user_id: int, role: Role | str, *, acting_role: Role, actor: Actor) -> Membership:
    """Give a member another role. Commits.

    Raises:
        NotFound: not a member. ValidationError: unknown role (``role``).
        NotAllowed: a non-owner making or changing an owner.
        InvalidState: it would leave the organization without an owner.
    """
    try:
        new_role = Role(role)
    except ValueError:
        raise ValidationError.single("role", "Choose one of the roles.") from None
    membership = get_membership(user_id)
    _check_may_touch(membership, new_role, Role(acting_role))
    old_role = Role(membership.role)
    if old_role == new_role:
        return membership
    if old_role == Role.OWNER and _owner_ids_locked() == [user_id]:
        raise InvalidState("The last owner cannot be demoted: make someone else owner first.")
    membership.role = new_role
    record_audit(actor, "member.role_changed", "user", user_id, {"from": old_role, "to": new_role})
    db.session.commit()
    return membership


def remove_member(user_id: int, *, acting_role: Role, actor: Actor) -> None:
    """Take a member out of the organization (their user stays). Commits.

    Raises:
        NotFound: not a member. NotAllowed: a non-owner removing an owner.
        InvalidState: the last owner.
    """
    membership = get_membership(user_id)
    _check_may_touch(membership, None, Role(acting_role))
    if Role(membership.role) == Role.OWNER and _owner_ids_locked() == [user_id]:
        raise InvalidState("The last owner cannot be removed.")
    email = db.session.scalar(select(User.email).where(User.id == user_id))
    record_audit(actor, "member.removed", "user", user_id, {"email": email})
    db.session.delete(membership)
    db.session.commit()


# --- invitations -------------------------------------------------------------------------


def _is_member(email: str) -> bool:
    return bool(
        db.session.scalar(
            select(
                exists()
                .where(Membership.user_id == User.id)
                .where(User.email == email)
                .where(Membership.organization_id == require_organization_id())
            )
        )
    )


def invite_member(
    email: str, role: Role | str, *, acting_role: Role, actor: Actor
) -> tuple[Invitation, str]:
    """Issue an invitation to the current organization. Commits the audit entry.

    Returns:
        (the invitation, its signed token for the link; not stored anywhere).

    Raises:
        ValidationError: bad email, already a member (``email``), unknown role (``role``).
        NotAllowed: a non-owner inviting an owner.
    """
    email = normalize_email(email)
    try:
        role = Role(role)
    except ValueError:
        raise ValidationError.single("role", "Choose one of the roles.") from None
    if role == Role.OWNER and Role(acting_role) != Role.OWNER:
        raise NotAllowed("Only an owner can invite owners.")
    if _is_member(email):
        raise ValidationError.single("email", f"{email} is already a member.")
    org_id = require_organization_id()
    invitation = Invitation(
        secrets.token_urlsafe(12), org_id, email, role, datetime.now(UTC), actor.label
    )
    token = _serializer().dumps({"i": invitation.id, "o": org_id, "e": email, "r": role.value})
    record_audit(
        actor, "member.invited", "invitation", invitation.id, {"email": email, "role": role}
    )
    db.session.commit()
    return invitation, token


def pending_invitations() -> list[Invitation]:
    """Invitations of the current organization not yet accepted, revoked or expired."""
    since = datetime.now(UTC) - INVITATION_MAX_AGE
    issued = db.session.scalars(
        select(AuditLog)
        .where(AuditLog.action == "member.invited", AuditLog.created_at >= since)
        .order_by(AuditLog.created_at.desc())
    ).all()
    closed = set(
        db.session.scalars(
            select(AuditLog.target_id).where(
                AuditLog.target_type == "invitation",
                AuditLog.action.in_(CLOSED),
                AuditLog.created_at >= since,
            )
        )
    )
    members = set(
        db.session.scalars(select(User.email).join(Membership, Membership.user_id == User.id))
    )
    pending = []
    for entry in issued:
        changes: dict[str, Any] = entry.changes or {}
        if entry.target_id in closed or changes.get("email") in members:
            continue
        pending.append(
            Invitation(
                str(entry.target_id),
                entry.organization_id,
                str(changes.get("email", "")),
                Role(changes.get("role", Role.VIEWER)),
                entry.created_at,
                entry.actor_label,
            )
        )
    return pending


def revoke_invitation(invitation_id: str, *, actor: Actor) -> None:
    """Make a pending invitation's link useless. Commits.

    Raises:
        NotFound: no such pending invitation in the current organization.
    """
    invitation = next((i for i in pending_invitations() if i.id == invitation_id), None)
    if invitation is None:
        raise NotFound("No such pending invitation.")
    record_audit(
        actor, "invitation.revoked", "invitation", invitation.id, {"email": invitation.email}
    )
    db.session.commit()


def read_invitation(token: str) -> Invitation:
    """Check an invitation link's token (no organization scope needed).

    Raises:
        InvalidInvitation: bad signature, expired, used, revoked, or already a member.
    """
    try:
        data, issued_at = _serializer().loads(
            token, max_age=int(INVITATION_MAX_AGE.total_seconds()), return_timestamp=True
        )
        invitation = Invitation(
            str(data["i"]), int(data["o"]), str(data["e"]), Role(data["r"]), issued_at
        )
    except SignatureExpired:
        raise InvalidInvitation("This invitation has expired. Ask for a new one.") from None
    except (BadSignature, KeyError, TypeError, ValueError):
        raise InvalidInvitation("This invitation link is not valid.") from None
    if db.session.get(Organization, invitation.organization_id) is None:
        raise InvalidInvitation("This invitation link is not valid.")
    with organization_scope(invitation.organization_id):
        closed = db.session.scalar(
            select(func.count())
            .select_from(AuditLog)
            .where(
                AuditLog.target_type == "invitation",
                AuditLog.target_id == invitation.id,
                AuditLog.action.in_(CLOSED),
            )
        )
        if closed:
            raise InvalidInvitation("This invitation was already used or withdrawn.")
        if _is_member(invitation.email):
            raise InvalidInvitation("You are already a member of this organization.")
    return invitation


def organization_name(organization_id: int) -> str:
    organization = db.session.get(Organization, organization_id)
    return organization.name if organization is not None else ""


def accept_invitation(token: str, *, password: str, name: str = "") -> User:
    """Join the organization of an invitation. Commits.

    A new email gets a user with this password; an existing user proves it is them with
    their password.

    Raises:
        InvalidInvitation: as :func:`read_invitation`, or used in the meantime.
        ValidationError: short password for a new user, wrong password (``password``).
    """
    invitation = read_invitation(token)
    user = find_user_by_email(invitation.email)
    if user is not None and (
        not user.is_active or not security.verify_password(user.password_hash, password)
    ):
        raise ValidationError.single(
            "password", "That is not the password of this account. Sign in as usual first?"
        )
    with organization_scope(invitation.organization_id):
        try:
            if user is None:
                user = create_user(invitation.email, password, name=name)
            joined = Actor("user", user.id, user.email)
            add_member(user, invitation.role, actor=joined)
            record_audit(
                joined,
                "invitation.accepted",
                "invitation",
                invitation.id,
                {"email": user.email, "role": invitation.role},
            )
            db.session.commit()
        except IntegrityError:
            db.session.rollback()
            raise InvalidInvitation("This invitation was already used.") from None
        except ValidationError:
            db.session.rollback()
            raise
    return user
