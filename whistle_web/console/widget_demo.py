"""The widget demo: a sample customer page with the in-app widget of one recipient.

Staff pick a recipient of their organization (``?recipient=<external_id>``, else the first
one); the page gets a recipient token minted here, the way a customer's backend would, and
mounts ``static/widget/whistle.js`` with it. A small form sends that recipient a test
notification so the live arrival can be watched.
"""

from __future__ import annotations

from typing import Any

from flask import flash, g, jsonify, redirect, render_template, request, url_for
from sqlalchemy import select

from whistle_web.channels.kinds import Channel
from whistle_web.console.access import actor, requires
from whistle_web.console.views import bp
from whistle_web.errors import DomainError, InvalidState, NotFound
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template, TemplateVersion
from whistle_web.notifications.services import trigger
from whistle_web.preferences.services import get_recipient, issue_recipient_token
from whistle_web.recipients.models import Recipient

MAX_EXTERNAL_ID = 255


def _chosen_recipient(external_id: str) -> Recipient:
    """The recipient asked for, else the organization's first one.

    Raises:
        NotFound: no such recipient, or the organization has none.
    """
    if external_id:
        if len(external_id) > MAX_EXTERNAL_ID:
            raise NotFound("No recipient with that id.")
        return get_recipient(external_id)
    recipient = db.session.scalar(select(Recipient).order_by(Recipient.id).limit(1))
    if recipient is None:
        raise NotFound("This organization has no recipients yet. Add one through the API first.")
    return recipient


def in_app_templates() -> list[Template]:
    """Published templates with in-app content (what a test notification can use)."""
    rows = db.session.execute(
        select(Template, TemplateVersion)
        .join(TemplateVersion, TemplateVersion.id == Template.published_version_id)
        .order_by(Template.name, Template.id)
    ).all()
    return [t for t, version in rows if Channel.IN_APP.value in (version.content or {})]


@bp.get("/widget/demo")
@requires("view")
def widget_demo() -> Any:
    """A sample host page showing the widget for a recipient of this organization."""
    external_id = request.args.get("recipient", "").strip()
    context: dict[str, Any] = {"external_id": external_id, "templates": in_app_templates()}
    try:
        recipient = _chosen_recipient(external_id)
        token, expires_at = issue_recipient_token(g.organization.id, recipient.external_id)
    except (NotFound, InvalidState) as exc:
        return render_template("widget_demo.html", error=exc.detail, **context), exc.status
    return render_template(
        "widget_demo.html",
        recipient=recipient,
        token=token,
        expires_at=expires_at,
        error=None,
        **context,
    )


@bp.post("/widget/demo/token")
@requires("view")
def widget_demo_token() -> Any:
    """A fresh token for the demo's widget when its own expires (its ``onTokenExpired``)."""
    external_id = str((request.get_json(silent=True) or {}).get("recipient") or "").strip()
    try:
        recipient = _chosen_recipient(external_id)
        token, expires_at = issue_recipient_token(g.organization.id, recipient.external_id)
    except (NotFound, InvalidState) as exc:
        return jsonify(error=exc.detail), exc.status
    return jsonify(token=token, expires_at=expires_at.isoformat())


@bp.post("/widget/demo/send")
@requires("send")
def widget_demo_send() -> Any:
    """Send the demo recipient an in-app notification from a template (as the API would)."""
    external_id = request.form.get("recipient", "").strip()
    template_key = request.form.get("template", "").strip()
    wants_json = request.accept_mimetypes.best == "application/json"
    try:
        recipient = _chosen_recipient(external_id)
        send_request = trigger(
            template_key,
            to=[recipient.external_id],
            channels=[Channel.IN_APP.value],
            data={"source": "widget demo"},
            actor=actor(),
        )
    except DomainError as exc:
        if wants_json:
            return jsonify(error=exc.detail), exc.status
        flash(f"Nothing was sent: {exc.detail}", "error")
    else:
        if wants_json:
            return jsonify(send_request_id=send_request.id, status="queued"), 202
        flash("Sent. It appears in the bell as soon as a worker delivers it.", "info")
    return redirect(url_for("console.widget_demo", recipient=external_id or None), 303)
