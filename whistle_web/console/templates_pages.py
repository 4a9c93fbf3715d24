"""Templates: the list, the per-channel editor with a live preview, versions, the layout.

The editor is one form. Typing re-renders the preview (``hx-post`` to
``template_preview``, debounced) through the workers' sandbox and the same render context a
send builds, and fills every field's error slot out of band, so syntax errors and unknown
variables show up inline while staff type. The email's HTML is never put into the console
page: it is stored for a few minutes in Redis and shown in a sandboxed iframe whose own
response forbids scripts (``template_preview_frame``).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from typing import Any

from flask import abort, current_app, flash, g, make_response, redirect, request, url_for
from flask_login import current_user
from redis.exceptions import RedisError

from whistle_web import get_redis
from whistle_web.console import access
from whistle_web.console.access import actor, can, requires
from whistle_web.console.views import bp
from whistle_web.errors import Conflict, FieldError, InvalidState, NotFound, ValidationError
from whistle_web.message_templates import services
from whistle_web.message_templates.models import Template
from whistle_web.message_templates.sms import sms_count

KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,99}")
# Per channel: (form field, content field, label, max length, widget).
CHANNELS: dict[str, dict[str, Any]] = {
    "email": {
        "label": "Email",
        "fields": [
            ("email_subject", "subject", "Subject", 1000, "input"),
            ("email_html", "html", "HTML body", 500_000, "code"),
            ("email_text", "text", "Plain-text body", 100_000, "textarea"),
        ],
    },
    "sms": {"label": "SMS", "fields": [("sms_text", "text", "Text", 2000, "textarea")]},
    "push": {
        "label": "Push",
        "fields": [
            ("push_title", "title", "Title", 500, "input"),
            ("push_body", "body", "Body", 4000, "textarea"),
        ],
    },
    "in_app": {
        "label": "In-app",
        "fields": [
            ("in_app_title", "title", "Title", 500, "input"),
            ("in_app_body", "body", "Body", 10_000, "textarea"),
            ("in_app_action_url", "action_url", "Action URL", 2000, "input"),
        ],
    },
}
REQUIRED = {"email": ("subject",), "sms": ("text",), "push": ("body",), "in_app": ("body",)}
FORM_FIELD = {
    f"channels.{channel}.{content}": form
    for channel, spec in CHANNELS.items()
    for form, content, *_ in spec["fields"]
}
# Who the preview is addressed to when no real recipient is chosen.
SAMPLE_RECIPIENT = {
    "external_id": "sample-recipient",
    "email": "ada@example.com",
    "phone": "+14155550100",
    "name": "Ada Lovelace",
    "locale": "en",
    "timezone": "Europe/London",
}
MAX_DATA_CHARS = 20_000
SLOT = re.compile(r"[A-Za-z0-9_\-]{16,64}")
LAYOUT_FIELDS = ("header_html", "footer_html", "brand_color")
FRAME_SECONDS = 600
FRAME_CSP = (
    "sandbox; default-src 'none'; img-src https: http: data:; style-src 'unsafe-inline'; "
    "font-src https: data:; frame-ancestors 'self'; form-action 'none'; base-uri 'none'"
)
SAMPLE_BODY = (
    "<h1>Hello {{ recipient.name }}</h1>\n<p>This is how the layout frames every email.</p>"
)


# --- form values ---------------------------------------------------------------------------


def _form_values(template: Template | None, content: dict[str, Any] | None) -> dict[str, str]:
    """The editor's field values for stored content."""
    values = {
        "key": template.key if template else "",
        "name": template.name if template else "",
        "description": template.description if template else "",
        "category": "",
        "preview_data": json.dumps(_sample_data(content or {}), indent=2),
        "preview_recipient": "",
        "preview_slot": _slot(),
    }
    if template is not None and template.category_id is not None:
        category = next(
            (c for c in services.category_choices() if c.id == template.category_id), None
        )
        values["category"] = category.key if category else ""
    for channel, spec in CHANNELS.items():
        for form, field_name, *_ in spec["fields"]:
            value = ((content or {}).get(channel) or {}).get(field_name)
            values[form] = value if isinstance(value, str) else ""
    return values


def _sample_data(content: dict[str, Any]) -> dict[str, str]:
    """``{"name": "sample name"}`` for each ``data.name`` the content reads."""
    names: list[str] = []
    for fields in content.values():
        for source in (fields or {}).values() if isinstance(fields, dict) else ():
            if isinstance(source, str):
                names += re.findall(r"\bdata\.([A-Za-z_][A-Za-z0-9_]*)", source)
    return {name: f"sample {name}" for name in dict.fromkeys(names)}


def _posted_values() -> dict[str, str]:
    names = ["key", "name", "description", "category", "preview_data", "preview_recipient"]
    names += [form for spec in CHANNELS.values() for form, *_ in spec["fields"]]
    values = {name: request.form.get(name, "").replace("\r\n", "\n") for name in names}
    values["preview_slot"] = _slot()
    return values


def _content(values: dict[str, str]) -> dict[str, dict[str, str]]:
    """The channels with at least one field filled in, as template content."""
    content: dict[str, dict[str, str]] = {}
    for channel, spec in CHANNELS.items():
        fields = {c: values[f] for f, c, *_ in spec["fields"] if values[f].strip()}
        if fields:
            content[channel] = fields
    return content


def _content_errors(values: dict[str, str], content: dict[str, Any]) -> list[FieldError]:
    """What a draft needs: at least one channel, each channel's required fields, lengths."""
    errors: list[FieldError] = []
    if not content:
        errors.append(FieldError("channels", "Fill in at least one channel."))
    for channel, spec in CHANNELS.items():
        for form, field_name, _label, limit, _ in spec["fields"]:
            if len(values[form]) > limit:
                errors.append(
                    FieldError(f"channels.{channel}.{field_name}", f"At most {limit:,} characters.")
                )
            if "\x00" in values[form]:
                errors.append(FieldError(f"channels.{channel}.{field_name}", "No NUL characters."))
        if channel not in content:
            continue
        for field_name in REQUIRED[channel]:
            if field_name not in content[channel]:
                label = next(lb for _, c, lb, *_ in spec["fields"] if c == field_name)
                errors.append(
                    FieldError(f"channels.{channel}.{field_name}", f"{label} is required.")
                )
        if channel == "email" and not ({"html", "text"} & set(content["email"])):
            errors.append(FieldError("channels.email.html", "An email needs HTML or text."))
    return errors


def _meta_errors(values: dict[str, str], *, new: bool) -> list[FieldError]:
    errors: list[FieldError] = []
    name = values["name"].strip()
    if not name:
        errors.append(FieldError("name", "Give the template a name."))
    elif len(name) > 200 or "\x00" in name:
        errors.append(FieldError("name", "At most 200 characters."))
    if len(values["description"]) > 2000 or "\x00" in values["description"]:
        errors.append(FieldError("description", "At most 2,000 characters."))
    if new and not KEY_PATTERN.fullmatch(values["key"].strip()):
        errors.append(
            FieldError("key", "Letters, digits and _ . : - (at most 100), starting with one.")
        )
    if values["category"] and values["category"] not in {
        c.key for c in services.category_choices()
    }:
        errors.append(FieldError("category", "Choose a category from the list."))
    return errors


def _error_map(errors: list[FieldError]) -> dict[str, list[str]]:
    """Errors keyed by the form field they belong to."""
    by_field: dict[str, list[str]] = {}
    for error in errors:
        name = FORM_FIELD.get(error.field, error.field)
        by_field.setdefault(name, []).append(error.message)
    return by_field


def _changes(values: dict[str, str]) -> dict[str, Any]:
    return {
        "name": values["name"].strip(),
        "description": values["description"],
        "category": values["category"] or None,
    }


# --- preview -------------------------------------------------------------------------------


def _slot() -> str:
    """The editor page's preview slot: every preview of one open page overwrites the one
    stored HTML (a fast typist never piles up copies), a new page gets a new slot."""
    slot = request.form.get("preview_slot", "")
    return slot if SLOT.fullmatch(slot) else secrets.token_urlsafe(18)


def _store_frame(html: str, slot: str) -> str | None:
    """Keep the email HTML for the preview iframe; the frame's URL, or None if Redis is down."""
    try:
        get_redis().set(_frame_key(slot), html, ex=FRAME_SECONDS)
    except (RedisError, OSError):  # a preview without the email frame beats an error page
        current_app.logger.warning("could not store an email preview", exc_info=True)
        return None
    # A new URL each time: the swapped-in iframe loads the new HTML, never a cached one.
    return url_for("console.template_preview_frame", token=slot, v=secrets.token_hex(4))


def _frame_key(token: str) -> str:
    return f"whistle:console:preview:{g.organization.id}:{current_user.id}:{token}"


def _preview(values: dict[str, str]) -> dict[str, Any]:
    """Render the editor's content for the preview pane, with every problem by field."""
    content = _content(values)
    errors: list[FieldError] = []
    data: Any = {}
    raw = values["preview_data"].strip() or "{}"
    if len(raw) > MAX_DATA_CHARS:
        errors.append(FieldError("preview_data", f"At most {MAX_DATA_CHARS:,} characters."))
    else:
        try:
            data = json.loads(raw)
        except ValueError as error:
            errors.append(FieldError("preview_data", f"Not valid JSON: {error}"))
        else:
            if not isinstance(data, dict):
                errors.append(FieldError("preview_data", "Give a JSON object, like {}."))
                data = {}
    external_id = values["preview_recipient"].strip() or None
    try:
        context = services.preview_context(
            data=data,
            recipient=None if external_id else SAMPLE_RECIPIENT,
            external_id=external_id,
            base_url=current_app.config["WHISTLE_BASE_URL"],
        )
    except ValidationError as exc:
        errors += [FieldError("preview_recipient", e.message) for e in exc.errors]
        context = services.preview_context(
            data=data, recipient=SAMPLE_RECIPIENT, base_url=current_app.config["WHISTLE_BASE_URL"]
        )
        external_id = None
    result = services.render_content(content, context, settings=services.organization_settings())
    errors += result.errors
    rendered = result.channels
    html = rendered.get("email", {}).get("html")
    sms = rendered.get("sms", {}).get("text")
    return {
        "rendered": rendered,
        "errors": _error_map(errors),
        "frame_url": _store_frame(html, values["preview_slot"]) if html else None,
        "sms": sms_count(sms) if sms is not None else None,
        "recipient": context["recipient"],
        "sample": external_id is None,
    }


def _editor_context(
    template: Template | None,
    values: dict[str, str],
    errors: list[FieldError] | None = None,
) -> dict[str, Any]:
    preview = _preview(values)
    field_errors = _error_map(errors or [])
    for name, messages in preview["errors"].items():
        field_errors.setdefault(name, [])
        field_errors[name] += [m for m in messages if m not in field_errors[name]]
    versions = services.list_versions(template) if template is not None else []
    return {
        "tpl": template,
        "values": values,
        "errors": field_errors,
        "preview": preview,
        "channels": CHANNELS,
        "categories": services.category_choices(),
        "versions": versions,
        "published": next((v for v in versions if v.id == template.published_version_id), None)
        if template is not None
        else None,
        "draft": versions[0] if versions and versions[0].state == "draft" else None,
        "layout": any(services.email_layout().values()),
        "sms_live": sms_count(values["sms_text"]),
    }


def _editor(
    template: Template | None,
    values: dict[str, str],
    errors: list[FieldError] | None = None,
    status: int = 200,
) -> Any:
    return access.render(
        "console/templates/edit.html",
        None,
        status=status,
        **_editor_context(template, values, errors),
    )


def _template_or_404(template_id: int) -> Template:
    try:
        return services.get_template_by_id(template_id)
    except NotFound:
        abort(404)


# --- routes --------------------------------------------------------------------------------


@bp.get("/templates")
@requires("view")
def templates() -> Any:
    """Every template with its channels, versions and when it was last edited."""
    query = request.args.get("q", "").strip().lower()
    rows = services.template_overview()
    if query:
        rows = [
            r for r in rows if query in r.template.key.lower() or query in r.template.name.lower()
        ]
    return access.render(
        "console/templates/index.html", "console/templates/_table.html", rows=rows, query=query
    )


@bp.route("/templates/new", methods=["GET", "POST"])
@requires("edit")
def template_new() -> Any:
    """Create a template: its key, name and first draft."""
    if request.method == "GET":
        values = _form_values(None, {"email": {"subject": "", "html": "", "text": ""}})
        return _editor(None, values)
    values = _posted_values()
    content = _content(values)
    errors = _meta_errors(values, new=True) + _content_errors(values, content)
    if not errors:
        try:
            template = services.create_template(
                values["key"].strip(),
                values["name"].strip(),
                content,
                description=values["description"],
                category=values["category"] or None,
                actor=actor(),
            )
        except Conflict as exc:
            errors.append(FieldError("key", exc.detail))
        except ValidationError as exc:
            errors += exc.errors
        else:
            flash(f"Template {template.name!r} created as a draft.", "info")
            return redirect(url_for("console.template_edit", template_id=template.id), 303)
    return _editor(None, values, errors, status=422)


@bp.route("/templates/<int:template_id>", methods=["GET", "POST"])
@requires("view")
def template_edit(template_id: int) -> Any:
    """The editor (read-only for viewers); a POST saves the draft (editors)."""
    template = _template_or_404(template_id)
    if request.method == "GET":
        latest = services.latest_version(template)
        return _editor(template, _form_values(template, latest.content if latest else {}))
    if not can("edit"):
        abort(403)
    values = _posted_values()
    values["key"] = template.key
    saved = _save(template, values)
    if isinstance(saved, list):
        return _editor(template, values, saved, status=422)
    flash(f"Draft saved (version {saved.version}).", "info")
    return redirect(url_for("console.template_edit", template_id=template.id), 303)


def _save(template: Template, values: dict[str, str]) -> Any:
    """Save the posted draft; its version, or the errors that kept it from being saved."""
    content = _content(values)
    errors = _meta_errors(values, new=False) + _content_errors(values, content)
    if errors:
        return errors
    try:
        return services.save_draft(template.key, content, changes=_changes(values), actor=actor())
    except ValidationError as exc:
        return exc.errors


@bp.post("/templates/<int:template_id>/publish")
@requires("edit")
def template_publish(template_id: int) -> Any:
    """Save what the editor holds, then publish it: sends use it from now on."""
    template = _template_or_404(template_id)
    values = _posted_values()
    values["key"] = template.key
    saved = _save(template, values)
    if isinstance(saved, list):
        return _editor(template, values, saved, status=422)
    try:
        services.publish_template(template.key, actor=actor())
    except ValidationError as exc:
        return _editor(template, values, exc.errors, status=422)
    except InvalidState:
        flash("Nothing new to publish: this content is the published version.", "info")
    else:
        flash(f"Version {saved.version} is published.", "info")
    return redirect(url_for("console.template_edit", template_id=template.id), 303)


@bp.post("/templates/preview")
@requires("view")
def template_preview() -> Any:
    """The preview pane for the editor's current content (a fragment for htmx)."""
    template_id = request.form.get("template_id", "")
    template = (
        _template_or_404(int(template_id))
        if template_id.isascii() and template_id.isdigit()
        else None
    )
    values = _posted_values()
    if template is not None:
        values["key"] = template.key
    return access.render(
        "console/templates/edit.html",
        "console/templates/_preview.html",
        **_editor_context(template, values),
    )


@bp.get("/templates/preview/<token>")
@requires("view")
def template_preview_frame(token: str) -> Any:
    """The email HTML of a preview, for the sandboxed iframe: no script can run in it."""
    if not SLOT.fullmatch(token):
        abort(404)
    try:
        html = get_redis().get(_frame_key(token))
    except (RedisError, OSError):
        html = None
    if html is None:
        abort(404)
    response = make_response(html)
    response.mimetype = "text/html"
    response.headers["Content-Security-Policy"] = FRAME_CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/templates/recipients")
@requires("view")
def template_recipients() -> Any:
    """Recipients to preview with, by external id or email prefix (a fragment)."""
    query = request.args.get("q", "")[:320]
    return access.render(
        "console/templates/_recipients.html",
        "console/templates/_recipients.html",
        recipients=services.find_preview_recipients(query),
        query=query.strip(),
    )


@bp.post("/templates/<int:template_id>/test")
@requires("send")
def template_test_send(template_id: int) -> Any:
    """Send the editor's email content to the signed-in member's own address."""
    template = _template_or_404(template_id)
    values = _posted_values()
    preview_data: Any = {}
    with contextlib.suppress(ValueError):
        preview_data = json.loads(values["preview_data"].strip() or "{}")
    if not isinstance(preview_data, dict):
        preview_data = {}
    status = 200
    try:
        outcome = services.send_test_email(
            _content(values),
            to=current_user.email,
            name=current_user.name,
            data=preview_data,
            template_id=template.id,
            base_url=current_app.config["WHISTLE_BASE_URL"],
            actor=actor(),
        )
    except (ValidationError, InvalidState) as exc:
        ok, message, status = False, exc.detail, exc.status
    else:
        ok = outcome.ok
        message = (
            f"Sent to {current_user.email}."
            if outcome.ok
            else f"The provider did not take it: {outcome.error}"
        )
        status = 200 if outcome.ok else 502
    if access.htmx:
        return access.render(
            "console/templates/_test_result.html",
            "console/templates/_test_result.html",
            status=status,
            ok=ok,
            message=message,
        )
    flash(message, "info" if ok else "error")
    return redirect(url_for("console.template_edit", template_id=template.id), 303)


@bp.get("/templates/<int:template_id>/versions")
@requires("view")
def template_versions(template_id: int) -> Any:
    """Every version of a template, newest first, with rollback for older ones."""
    template = _template_or_404(template_id)
    return access.render(
        "console/templates/versions.html",
        "console/templates/_versions.html",
        tpl=template,
        versions=services.list_versions(template),
    )


@bp.get("/templates/<int:template_id>/versions/<int:number>")
@requires("view")
def template_version(template_id: int, number: int) -> Any:
    """One version's content, read-only."""
    template = _template_or_404(template_id)
    try:
        version = services.get_version(template, number)
    except NotFound:
        abort(404)
    return access.render(
        "console/templates/version.html",
        None,
        tpl=template,
        version=version,
        channels=CHANNELS,
    )


@bp.post("/templates/<int:template_id>/versions/<int:number>/rollback")
@requires("edit")
def template_rollback(template_id: int, number: int) -> Any:
    """Publish an older version's content again, as a new version (the latest draft is
    simply published)."""
    template = _template_or_404(template_id)
    draft = services.latest_draft(template)
    try:
        if draft is not None and draft.version == number:
            services.publish_template(template.key, actor=actor())
            message = f"Version {number} is published."
        else:
            version = services.rollback_template(template.key, number, actor=actor())
            message = f"Version {number} is published again as version {version.version}."
    except NotFound:
        abort(404)
    except (InvalidState, ValidationError) as exc:
        flash(f"Version {number} was not published: {exc.detail}", "error")
        return redirect(url_for("console.template_versions", template_id=template.id), 303)
    flash(message, "info")
    return redirect(url_for("console.template_versions", template_id=template.id), 303)


@bp.post("/templates/<int:template_id>/delete")
@requires("edit")
def template_delete(template_id: int) -> Any:
    """Delete a template nothing has used yet."""
    template = _template_or_404(template_id)
    try:
        services.delete_template(template.key, actor=actor())
    except Conflict as exc:
        flash(exc.detail, "error")
        return redirect(url_for("console.template_edit", template_id=template.id), 303)
    flash(f"Template {template.name!r} deleted.", "info")
    return redirect(url_for("console.templates"), 303)


# --- the organization's email layout -------------------------------------------------------


def _layout_values() -> dict[str, str]:
    return {
        "header_html": request.form.get("header_html", "").replace("\r\n", "\n"),
        "footer_html": request.form.get("footer_html", "").replace("\r\n", "\n"),
        "brand_color": request.form.get("brand_color", "").strip(),
        "preview_slot": _slot(),
    }


def _layout_preview(values: dict[str, str]) -> dict[str, Any]:
    errors = services.check_layout(values)
    frame = None
    if not errors:
        context = services.preview_context(
            recipient=SAMPLE_RECIPIENT, base_url=current_app.config["WHISTLE_BASE_URL"]
        )
        settings = {"email_layout": {k: values[k] for k in LAYOUT_FIELDS}}
        result = services.render_content(
            {"email": {"html": SAMPLE_BODY}}, context, settings=settings
        )
        errors = [FieldError("header_html", e.message) for e in result.errors]
        html = result.channels.get("email", {}).get("html")
        frame = _store_frame(html, values["preview_slot"]) if html and not errors else None
    return {"values": values, "errors": _error_map(errors), "frame_url": frame}


@bp.route("/templates/layout", methods=["GET", "POST"])
@requires("manage")
def template_layout() -> Any:
    """The header, footer and brand colour wrapped around every email."""
    if request.method == "GET":
        return access.render(
            "console/templates/layout.html",
            None,
            **_layout_preview({**services.email_layout(), "preview_slot": _slot()}),
        )
    values = _layout_values()
    try:
        services.update_email_layout(**{k: values[k] for k in LAYOUT_FIELDS}, actor=actor())
    except ValidationError as exc:
        context = _layout_preview(values)
        context["errors"] = _error_map(exc.errors)
        return access.render("console/templates/layout.html", None, status=422, **context)
    flash("Email layout saved. Every email sent from now on uses it.", "info")
    return redirect(url_for("console.template_layout"), 303)


@bp.post("/templates/layout/preview")
@requires("manage")
def template_layout_preview() -> Any:
    """The layout preview for unsaved changes (a fragment for htmx)."""
    return access.render(
        "console/templates/layout.html",
        "console/templates/_layout_preview.html",
        **_layout_preview(_layout_values()),
    )
