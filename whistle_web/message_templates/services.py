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


def _unknown_variables(source: str, path: str) -> list[FieldError]:
    try:
        tree = _parser.parse(source)
    except TemplateSyntaxError as error:  # compile_content would have caught it first
        return [FieldError(path, f"Line {error.lineno}: {error.message}")]
    unknown = meta.find_undeclared_variables(tree) - _ALLOWED
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
    context = {
        "recipient": profile,
        "data": dict(data or {}),
        "organization": {"name": organization.name if organization else ""},
        "unsubscribe_url": f"{base_url}/t/u/preview",
        "preferences_url": f"{base_url}/p/preview",
    }
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
