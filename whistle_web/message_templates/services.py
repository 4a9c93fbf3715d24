"""Create templates, add draft versions, publish, preview and delete.

Versions are immutable: new content is a new draft version; publishing makes the latest
draft the version sends use (the one published before is archived). Publishing checks that
every field compiles in the sandbox and names only the variables a send provides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jinja2 import TemplateSyntaxError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sqlalchemy import delete, exists, func, select
from sqlalchemy.dialects.postgresql import distinct_on

from whistle_web.campaigns.models import Campaign
from whistle_web.errors import Actor, Conflict, FieldError, InvalidState, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template, TemplateVersion, VersionState
from whistle_web.message_templates.rendering import CompiledContent, RenderError, compile_content
from whistle_web.notifications.models import SendRequest
from whistle_web.organizations.models import Organization
from whistle_web.organizations.services import record_audit
from whistle_web.preferences.models import Category
from whistle_web.recipients.models import Recipient
from whistle_web.tenancy import require_organization_id

# What a send puts in the context (see the dispatcher): nothing else is defined.
VARIABLES = ("recipient", "data", "organization", "unsubscribe_url", "preferences_url")
_parser = ImmutableSandboxedEnvironment()
_ALLOWED = frozenset(VARIABLES) | frozenset(_parser.globals)
RECIPIENT_FIELDS = ("external_id", "email", "phone", "name", "locale", "timezone")


@dataclass(frozen=True)
class Preview:
    version: int
    channels: dict[str, dict[str, Any]]


def _created_by(actor: Actor) -> int | None:
    return actor.id if actor.type == "user" else None


def get_template(key: str, *, lock: bool = False) -> Template:
    """Raises NotFound: no template with this key in the current organization."""
    template = None
    if "\x00" not in key:
        stmt = select(Template).where(Template.key == key)
        template = db.session.scalar(stmt.with_for_update() if lock else stmt)
    if template is None:
        raise NotFound(f"No template {key!r}.")
    return template


def category_id(key: str | None, field_name: str = "category") -> int | None:
    """Raises ValidationError: no category with this key."""
    if key is None:
        return None
    found = None
    if "\x00" not in key:
        found = db.session.scalar(select(Category.id).where(Category.key == key))
    if found is None:
        raise ValidationError.single(field_name, f"No category {key!r}.")
    return found


def latest_version(template: Template) -> TemplateVersion | None:
    return db.session.scalar(
        select(TemplateVersion)
        .where(TemplateVersion.template_id == template.id)
        .order_by(TemplateVersion.version.desc())
        .limit(1)
    )


def latest_draft(template: Template) -> TemplateVersion | None:
    """The newest draft newer than the published version, if any."""
    latest = latest_version(template)
    if latest is None or latest.state != VersionState.DRAFT:
        return None
    return latest


def published_version(template: Template) -> TemplateVersion | None:
    if template.published_version_id is None:
        return None
    return db.session.get(TemplateVersion, template.published_version_id)


def _add_version(template: Template, content: dict[str, Any], actor: Actor) -> TemplateVersion:
    number = (
        db.session.scalar(
            select(func.max(TemplateVersion.version)).where(
                TemplateVersion.template_id == template.id
            )
        )
        or 0
    ) + 1
    version = TemplateVersion(
        template_id=template.id,
        version=number,
        state=VersionState.DRAFT,
        content=content,
        created_by_id=_created_by(actor),
    )
    db.session.add(version)
    db.session.flush()
    return version


def create_template(
    key: str,
    name: str,
    content: dict[str, Any],
    *,
    description: str = "",
    category: str | None = None,
    actor: Actor,
) -> Template:
    """Create a template with a draft version 1. Commits.

    Raises:
        Conflict: the key is taken.
        ValidationError: ``category`` names no category.
    """
    cat_id = category_id(category)
    if db.session.scalar(select(exists().where(Template.key == key))):
        raise Conflict(f"A template with key {key!r} already exists.")
    template = Template(key=key, name=name, description=description, category_id=cat_id)
    db.session.add(template)
    db.session.flush()
    _add_version(template, content, actor)
    record_audit(
        actor,
        "template.created",
        "template",
        template.id,
        {"key": key, "name": name, "category": category, "channels": sorted(content)},
    )
    db.session.commit()
    return template


def update_template(key: str, changes: dict[str, Any], *, actor: Actor) -> Template:
    """Change ``name``, ``description``, ``category`` (a key, or None); ``content`` adds a
    new draft version. Commits.

    Raises:
        NotFound: no such template.
        ValidationError: ``category`` names no category.
    """
    template = get_template(key, lock=True)
    audit: dict[str, Any] = {}
    for name in ("name", "description"):
        if name in changes and getattr(template, name) != changes[name]:
            setattr(template, name, changes[name])
            audit[name] = changes[name]
    if "category" in changes:
        cat_id = category_id(changes["category"])
        if cat_id != template.category_id:
            template.category_id = cat_id
            audit["category"] = changes["category"]
    if "content" in changes:
        version = _add_version(template, changes["content"], actor)
        audit["draft_version"] = version.version
        template.updated_at = func.now()
    if audit:
        record_audit(actor, "template.updated", "template", template.id, audit)
        db.session.commit()
    return template


def check_content(content: Mapping[str, Any]) -> list[FieldError]:
    """Every problem that keeps the content from being published, by field.

    A field must compile in the sandbox (the message names the Jinja line) and use only
    the top-level variables ``recipient``, ``data``, ``organization``, ``unsubscribe_url``
    and ``preferences_url``.
    """
    errors: list[FieldError] = []
    compiled = compile_content(dict(content))
    for channel, fields in compiled.fields.items():
        for field_name, result in fields.items():
            path = f"channels.{channel}.{field_name}"
            if isinstance(result, RenderError):
                message = str(result).removeprefix(f"{channel}.{field_name}").lstrip(" :")
                errors.append(FieldError(path, message[:1].upper() + message[1:]))
                continue
            if result is None:
                continue
            errors += _unknown_variables(content[channel][field_name], path)
    return errors


def _unknown_variables(
    source: str, path: str, allowed: frozenset[str] = _ALLOWED
) -> list[FieldError]:
    try:
        tree = _parser.parse(source)
    except TemplateSyntaxError as error:  # compile_content would have caught it first
        return [FieldError(path, f"Line {error.lineno}: {error.message}")]
    unknown = meta.find_undeclared_variables(tree) - allowed
    errors = []
    for name in sorted(unknown):
        line = next(
            (n.lineno for n in tree.find_all(nodes.Name) if n.name == name and n.ctx == "load"),
            None,
        )
        where = f"Line {line}: " if line else ""
        errors.append(
            FieldError(
                path,
                f"{where}unknown variable {name!r}; use recipient, data, organization, "
                "unsubscribe_url or preferences_url.",
            )
        )
    return errors


def publish_template(key: str, *, actor: Actor, now: datetime | None = None) -> Template:
    """Publish the latest draft; the version published before is archived. Commits.

    Raises:
        NotFound: no such template.
        InvalidState: no draft newer than the published version.
        ValidationError: a field does not compile or names an unknown variable
            (``channels.<channel>.<field>``).
    """
    template = get_template(key, lock=True)
    draft = latest_draft(template)
    if draft is None:
        raise InvalidState(f"Template {key!r} has no draft newer than its published version.")
    errors = check_content(draft.content)
    if errors:
        raise ValidationError(errors)
    previous = published_version(template)
    if previous is not None:
        previous.state = VersionState.ARCHIVED
    draft.state = VersionState.PUBLISHED
    draft.published_at = now or datetime.now(UTC)
    template.published_version_id = draft.id
    template.updated_at = func.now()
    record_audit(
        actor,
        "template.published",
        "template",
        template.id,
        {"version": draft.version, "previous": previous.version if previous else None},
    )
    db.session.commit()
    return template


def preview_context(
    *,
    data: Mapping[str, Any] | None = None,
    recipient: Mapping[str, Any] | None = None,
    external_id: str | None = None,
    base_url: str = "",
) -> dict[str, Any]:
    """The render context of a preview, shaped like the dispatcher's for a real send.

    The recipient is a stored one (``external_id``), an inline profile, or a blank one;
    the unsubscribe and preference links point at placeholders.

    Raises:
        ValidationError: ``external_id`` names no recipient.
    """
    profile: dict[str, Any] = {name: None for name in RECIPIENT_FIELDS}
    profile["attributes"] = {}
    if external_id is not None:
        stored = None
        if "\x00" not in external_id:
            stored = db.session.scalar(
                select(Recipient).where(Recipient.external_id == external_id)
            )
        if stored is None:
            raise ValidationError.single("external_id", f"No recipient {external_id!r}.")
        profile.update({name: getattr(stored, name) for name in RECIPIENT_FIELDS})
        profile["attributes"] = stored.attributes or {}
    elif recipient is not None:
        profile.update({k: v for k, v in recipient.items() if v is not None})
    profile["id"] = profile["external_id"]
    organization = db.session.get(Organization, require_organization_id())
    return {
        "recipient": profile,
        "data": dict(data or {}),
        "organization": {"name": organization.name if organization else ""},
        "unsubscribe_url": f"{base_url}/t/u/preview",
        "preferences_url": f"{base_url}/p/preview",
    }


def preview_template(
    key: str,
    *,
    data: Mapping[str, Any] | None = None,
    recipient: Mapping[str, Any] | None = None,
    external_id: str | None = None,
    version: int | None = None,
    base_url: str = "",
) -> Preview:
    """Render a version (the latest one by default) with sample data.

    The recipient is a stored one (``external_id``), an inline profile, or a blank one.

    Raises:
        NotFound: no such template or version.
        ValidationError: ``external_id`` names no recipient; a field fails to render
            (``channels.<channel>.<field>``).
    """
    template = get_template(key)
    if version is None:
        chosen = latest_version(template)
    else:
        chosen = db.session.scalar(
            select(TemplateVersion).where(
                TemplateVersion.template_id == template.id, TemplateVersion.version == version
            )
        )
    if chosen is None:
        raise NotFound(f"Template {key!r} has no version {version}.")
    context = preview_context(
        data=data, recipient=recipient, external_id=external_id, base_url=base_url
    )
    compiled = compile_content(chosen.content)
    rendered: dict[str, dict[str, Any]] = {}
    errors: list[FieldError] = []
    for channel, fields in compiled.fields.items():
        rendered[channel] = {}
        for field_name, result in fields.items():
            try:
                out = CompiledContent({channel: {field_name: result}}).render(channel, context)
            except RenderError as error:
                message = str(error).removeprefix(f"{channel}.{field_name}").lstrip(" :")
                errors.append(
                    FieldError(f"channels.{channel}.{field_name}", message or "Render failed.")
                )
                continue
            rendered[channel][field_name] = out.get(field_name, chosen.content[channel][field_name])
    if errors:
        raise ValidationError(errors)
    return Preview(version=chosen.version, channels=rendered)


def template_in_use(template_id: int) -> bool:
    """A campaign or a send (whose history keeps the template) refers to it."""
    return bool(
        db.session.scalar(select(exists().where(Campaign.template_id == template_id)))
        or db.session.scalar(select(exists().where(SendRequest.template_id == template_id)))
    )


def delete_template(key: str, *, actor: Actor) -> None:
    """Delete a template and its versions. Commits.

    Raises:
        NotFound: no such template.
        Conflict: a campaign uses it, or it was sent (the send history refers to it).
    """
    template = get_template(key, lock=True)
    if template_in_use(template.id):
        raise Conflict(
            f"Template {key!r} is used by a campaign or was already sent; it cannot be deleted."
        )
    db.session.execute(delete(Template).where(Template.id == template.id))
    record_audit(actor, "template.deleted", "template", template.id, {"key": key})
    db.session.commit()


# --- the console's editor: overview, drafts, rollback, live preview, layout, test send ----


@dataclass(frozen=True)
class TemplateSummary:
    """One row of the console's template list."""

    template: Template
    category: str | None
    channels: list[str]
    published: int | None  # the published version's number
    latest: int | None
    has_draft: bool


def template_overview() -> list[TemplateSummary]:
    """Every template of the organization with its category, channels and versions."""
    rows = db.session.execute(
        select(Template, Category.name)
        .outerjoin(Category, Category.id == Template.category_id)
        .order_by(Template.name, Template.id)
    ).all()
    latest = {
        v.template_id: v
        for v in db.session.scalars(
            select(TemplateVersion)
            .ext(distinct_on(TemplateVersion.template_id))
            .order_by(TemplateVersion.template_id, TemplateVersion.version.desc())
        )
    }
    published_ids = [t.published_version_id for t, _ in rows if t.published_version_id]
    published = dict(
        db.session.execute(
            select(TemplateVersion.id, TemplateVersion.version).where(
                TemplateVersion.id.in_(published_ids)
            )
        ).all()
        if published_ids
        else []
    )
    summaries = []
    for template, category_name in rows:
        last = latest.get(template.id)
        summaries.append(
            TemplateSummary(
                template=template,
                category=category_name,
                channels=last.channels if last else [],
                published=published.get(template.published_version_id),
                latest=last.version if last else None,
                has_draft=last is not None and last.state == VersionState.DRAFT,
            )
        )
    return summaries


def get_template_by_id(template_id: int) -> Template:
    """Raises NotFound: no template with this id in the current organization."""
    template = db.session.get(Template, template_id) if 0 < template_id < 2**63 else None
    if template is None:
        raise NotFound("No such template.")
    return template


def list_versions(template: Template) -> list[TemplateVersion]:
    """The template's versions, newest first."""
    return list(
        db.session.scalars(
            select(TemplateVersion)
            .where(TemplateVersion.template_id == template.id)
            .order_by(TemplateVersion.version.desc())
        )
    )


def get_version(template: Template, number: int) -> TemplateVersion:
    """Raises NotFound: the template has no such version."""
    if not 0 < number < 2**31:
        raise NotFound(f"Template {template.key!r} has no version {number}.")
    version = db.session.scalar(
        select(TemplateVersion).where(
            TemplateVersion.template_id == template.id, TemplateVersion.version == number
        )
    )
    if version is None:
        raise NotFound(f"Template {template.key!r} has no version {number}.")
    return version


def category_choices() -> list[Category]:
    return list(db.session.scalars(select(Category).order_by(Category.name, Category.id)))


def save_draft(
    key: str, content: dict[str, Any], *, changes: Mapping[str, Any] | None = None, actor: Actor
) -> TemplateVersion:
    """Save the editor's content as the template's draft. Commits.

    The latest version is updated in place while it is an unpublished draft (an editor's
    saves are one draft, not a version each); after a publish the next save starts a new
    draft. Published and archived versions never change. ``changes`` may set ``name``,
    ``description`` and ``category`` as in :func:`update_template`.

    Raises:
        NotFound: no such template.
        ValidationError: ``category`` names no category.
    """
    template = get_template(key, lock=True)
    audit: dict[str, Any] = {}
    for name in ("name", "description"):
        if changes and name in changes and getattr(template, name) != changes[name]:
            setattr(template, name, changes[name])
            audit[name] = changes[name]
    if changes and "category" in changes:
        cat_id = category_id(changes["category"])
        if cat_id != template.category_id:
            template.category_id = cat_id
            audit["category"] = changes["category"]
    latest = latest_version(template)
    if latest is None or latest.content != content:
        if latest is not None and latest.state == VersionState.DRAFT:
            latest.content = dict(content)
            latest.created_by_id = _created_by(actor) or latest.created_by_id
            version = latest
        else:
            version = _add_version(template, dict(content), actor)
        audit["draft_version"] = version.version
    else:
        version = latest
    if audit:
        template.updated_at = func.now()
        record_audit(actor, "template.updated", "template", template.id, audit)
        db.session.commit()
    return version


def rollback_template(
    key: str, number: int, *, actor: Actor, now: datetime | None = None
) -> TemplateVersion:
    """Publish an older version's content again, as a new version. Commits.

    History stays linear: the old version is copied into a new draft which is then
    published (the version published before is archived). A newer unpublished draft stays
    in the history, below the new version.

    Raises:
        NotFound: no such template or version.
        InvalidState: that version is the published one.
        ValidationError: its content no longer passes the publish checks.
    """
    template = get_template(key, lock=True)
    source = get_version(template, number)
    if source.id == template.published_version_id:
        raise InvalidState(f"Version {number} is the published version already.")
    errors = check_content(source.content)
    if errors:
        raise ValidationError(errors)
    version = _add_version(template, dict(source.content), actor)
    previous = published_version(template)
    if previous is not None:
        previous.state = VersionState.ARCHIVED
    version.state = VersionState.PUBLISHED
    version.published_at = now or datetime.now(UTC)
    template.published_version_id = version.id
    template.updated_at = func.now()
    record_audit(
        actor,
        "template.rolled_back",
        "template",
        template.id,
        {
            "version": version.version,
            "from_version": number,
            "previous": previous.version if previous else None,
        },
    )
    db.session.commit()
    return version


@dataclass(frozen=True)
class ContentPreview:
    """Rendered fields per channel, and every problem found, by field path."""

    channels: dict[str, dict[str, Any]]
    errors: list[FieldError]


def render_content(
    content: Mapping[str, Any], context: dict[str, Any], *, settings: dict[str, Any] | None = None
) -> ContentPreview:
    """Render unsaved content the way a send would, reporting problems instead of raising.

    Every field is checked as publishing checks it (syntax with its line, unknown
    variables) and rendered in the workers' sandbox with ``context`` (see
    :func:`preview_context`). The email's HTML is wrapped in the organization's layout
    (``settings``); a layout that fails to render is reported at ``layout``.
    """
    from whistle_web.message_templates.layout import apply_layout

    errors = check_content(content)
    failed = {e.field for e in errors}
    compiled = compile_content(dict(content))
    rendered: dict[str, dict[str, Any]] = {}
    for channel, fields in compiled.fields.items():
        rendered[channel] = {}
        for field_name, result in fields.items():
            path = f"channels.{channel}.{field_name}"
            if path in failed and isinstance(result, RenderError):
                continue
            try:
                out = CompiledContent({channel: {field_name: result}}).render(channel, context)
            except RenderError as error:
                message = str(error).removeprefix(f"{channel}.{field_name}").lstrip(" :")
                errors.append(FieldError(path, message or "Render failed."))
                continue
            rendered[channel][field_name] = out.get(field_name, content[channel][field_name])
    html = rendered.get("email", {}).get("html")
    if html:
        try:
            rendered["email"]["html"] = apply_layout(html, settings, context)
        except RenderError as error:
            errors.append(FieldError("layout", str(error)))
    return ContentPreview(channels=rendered, errors=errors)


def find_preview_recipients(query: str, *, limit: int = 8) -> list[Recipient]:
    """Recipients whose external id or email starts with ``query`` (case-insensitive)."""
    query = query.strip()
    if not query or "\x00" in query:
        return []
    pattern = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return list(
        db.session.scalars(
            select(Recipient)
            .where(
                Recipient.external_id.ilike(pattern, escape="\\")
                | Recipient.email.ilike(pattern, escape="\\")
            )
            .order_by(Recipient.external_id)
            .limit(limit)
        )
    )


def _organization() -> Organization:
    organization = db.session.get(Organization, require_organization_id())
    if organization is None:
        raise NotFound("No such organization.")
    return organization


def organization_settings() -> dict[str, Any]:
    """The current organization's settings (branding, sender defaults, email layout)."""
    return dict(_organization().settings or {})


def email_layout() -> dict[str, str]:
    """The current organization's email layout: header_html, footer_html, brand_color."""
    from whistle_web.message_templates.layout import layout_settings

    return layout_settings(_organization().settings)


def check_layout(layout: Mapping[str, str]) -> list[FieldError]:
    """Problems with a layout, by field: colour format, size, syntax, unknown variables."""
    from whistle_web.message_templates.layout import MAX_HTML_CHARS, valid_colour

    errors = []
    colour = layout.get("brand_color", "")
    if colour and not valid_colour(colour):
        errors.append(FieldError("brand_color", "Use a colour like #1a2b3c."))
    allowed = _ALLOWED | {"brand_color"}
    for name in ("header_html", "footer_html"):
        source = layout.get(name, "")
        if len(source) > MAX_HTML_CHARS:
            errors.append(FieldError(name, f"At most {MAX_HTML_CHARS:,} characters."))
            continue
        compiled = compile_content({"layout": {"html": source}}).fields["layout"]["html"]
        if isinstance(compiled, RenderError):
            message = str(compiled).removeprefix("layout.html").lstrip(" :")
            errors.append(FieldError(name, message[:1].upper() + message[1:]))
            continue
        errors += _unknown_variables(source, name, allowed)
    return errors


def update_email_layout(
    *, header_html: str, footer_html: str, brand_color: str, actor: Actor
) -> dict[str, str]:
    """Store the organization's email layout, applied to every email sent after. Commits.

    Raises:
        ValidationError: at ``header_html``, ``footer_html`` or ``brand_color``.
    """
    from whistle_web.message_templates.layout import SETTINGS_KEY

    layout = {
        "header_html": header_html,
        "footer_html": footer_html,
        "brand_color": brand_color.strip().lower(),
    }
    errors = check_layout(layout)
    if errors:
        raise ValidationError(errors)
    organization = _organization()
    # A new dict: the JSONB column is not a mutable-tracking type.
    organization.settings = {**(organization.settings or {}), SETTINGS_KEY: layout}
    record_audit(
        actor,
        "organization.email_layout_updated",
        "organization",
        organization.id,
        {"brand_color": layout["brand_color"], "fields": sorted(k for k, v in layout.items() if v)},
    )
    db.session.commit()
    return layout


def send_test_email(
    content: Mapping[str, Any],
    *,
    to: str,
    name: str = "",
    data: Mapping[str, Any] | None = None,
    template_id: int | None = None,
    base_url: str = "",
    actor: Actor,
    budget: float | None = None,
) -> Any:
    """Send the email channel of ``content`` to ``to`` now, through the organization's
    first enabled email provider, and return its :class:`ProbeOutcome`. Commits the audit.

    No recipient is created: the staff member is an inline profile (``to`` and ``name``) in
    the render context, ``data`` is the sample data, and the links are preview
    placeholders. The organization's layout is applied as for any email.

    Raises:
        InvalidState: the organization has no enabled email provider.
        ValidationError: no email content, or it does not pass the publish checks or
            fails to render.
    """
    import uuid

    from whistle_web.channels.base import Message
    from whistle_web.channels.kinds import Channel, ProviderKind
    from whistle_web.channels.models import Provider
    from whistle_web.channels.services import (
        TEST_BUDGET_SECONDS,
        TIMEOUT_KINDS,
        send_with_budget,
    )

    email = content.get("email")
    if not isinstance(email, dict) or not email:
        raise ValidationError.single("channels.email", "The template has no email content.")
    provider = db.session.scalar(
        select(Provider)
        .where(Provider.channel == Channel.EMAIL, Provider.enabled.is_(True))
        .order_by(Provider.priority, Provider.id)
        .limit(1)
    )
    if provider is None:
        raise InvalidState("Add an email provider in Settings before sending a test.")
    context = preview_context(
        data=data, recipient={"email": to, "name": name or None}, base_url=base_url
    )
    preview = render_content({"email": email}, context, settings=_organization().settings)
    if preview.errors:
        raise ValidationError(preview.errors)
    body = {k: v for k, v in preview.channels["email"].items() if v}
    budget = TEST_BUDGET_SECONDS if budget is None else budget
    settings = dict(provider.settings or {})
    kind = ProviderKind(provider.kind)
    if kind in TIMEOUT_KINDS:
        try:
            timeout = float(settings.get("timeout") or budget)
        except (TypeError, ValueError):
            timeout = budget
        settings["timeout"] = min(timeout if timeout > 0 else budget, budget)
    domain = str(settings.get("from_email") or "").rpartition("@")[2] or "whistle.invalid"
    message = Message(
        0,
        Channel.EMAIL,
        to,
        body,
        headers={"Message-ID": f"<whistle.test.{uuid.uuid4().hex}@{domain}>"},
        meta={"organization_id": require_organization_id(), "test": True},
    )
    outcome = send_with_budget(kind, settings, provider.get_credentials(), message, budget)
    record_audit(
        actor,
        "template.test_sent",
        "template",
        template_id,
        {"to": to, "provider": provider.name, "ok": outcome.ok, "error": outcome.error},
    )
    db.session.commit()
    return outcome
