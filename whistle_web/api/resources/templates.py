"""Message templates: content per channel in immutable versions, publish, preview."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from flask import current_app
from pydantic import Field, model_validator
from sqlalchemy import func, select

from whistle_web.api import bp
from whistle_web.api.framework import Out, Schema, current_actor, endpoint, page, values_by_id
from whistle_web.api.resources.audiences import (
    Description,
    ExternalId,
    JsonObject,
    Key,
    Name,
    PageQuery,
    Text,
)
from whistle_web.errors import ValidationError
from whistle_web.extensions import db
from whistle_web.message_templates import services
from whistle_web.message_templates.models import Template, TemplateVersion
from whistle_web.preferences.models import Category

TAGS = ["Templates"]


def _source(max_length: int, required: bool = True) -> Any:
    return Field(
        min_length=1 if required else 0,
        max_length=max_length,
        description="Jinja (sandboxed): `{{ recipient.email }}`, `{{ data.x }}`, ...",
    )


class TemplateEmailContent(Schema):
    subject: Annotated[Text, _source(1000)]
    html: Annotated[Text, _source(500_000, required=False)] | None = None
    text: Annotated[Text, _source(100_000, required=False)] | None = None

    @model_validator(mode="after")
    def _has_body(self) -> TemplateEmailContent:
        if not (self.html or self.text):
            raise ValueError("An email needs `html` or `text`.")
        return self


class TemplateSmsContent(Schema):
    text: Annotated[Text, _source(2000)]


class TemplatePushContent(Schema):
    title: Annotated[Text, _source(500, required=False)] | None = None
    body: Annotated[Text, _source(4000)]


class TemplateInAppContent(Schema):
    title: Annotated[Text, _source(500, required=False)] | None = None
    body: Annotated[Text, _source(10_000)]
    action_url: Annotated[Text, _source(2000, required=False)] | None = None


class TemplateChannels(Schema):
    email: TemplateEmailContent | None = None
    sms: TemplateSmsContent | None = None
    push: TemplatePushContent | None = None
    in_app: TemplateInAppContent | None = None

    @model_validator(mode="after")
    def _has_a_channel(self) -> TemplateChannels:
        if not self.content():
            raise ValueError("Give the content of at least one channel.")
        return self

    def content(self) -> dict[str, dict[str, Any]]:
        return self.model_dump(exclude_none=True)


class TemplateIn(Schema):
    key: Key
    name: Name
    description: Description = ""
    category: Key | None = Field(default=None, description="A category key.")
    channels: TemplateChannels


class TemplatePatch(Schema):
    name: Name = None  # type: ignore[assignment]
    description: Description = None  # type: ignore[assignment]
    category: Key | None = Field(default=None, description="A category key; `null` removes it.")
    channels: TemplateChannels = Field(
        default=None,  # type: ignore[arg-type]
        description="New content for every channel: saved as a new draft version.",
    )


class TemplateVersionOut(Out):
    version: int
    state: str
    channels: dict[str, dict[str, Any]]
    created_at: datetime
    published_at: datetime | None

    @classmethod
    def of(cls, version: TemplateVersion) -> TemplateVersionOut:
        return cls(
            version=version.version,
            state=version.state.value,
            channels=version.content or {},
            created_at=version.created_at,
            published_at=version.published_at,
        )


class TemplateOut(Out):
    key: str
    name: str
    description: str
    category: str | None
    published_version: int | None
    latest_version: int
    created_at: datetime
    updated_at: datetime


class TemplateDetailOut(TemplateOut):
    published: TemplateVersionOut | None = Field(description="The version sends use.")
    draft: TemplateVersionOut | None = Field(
        description="The latest draft, when newer than the published version."
    )


class TemplatePage(Out):
    data: list[TemplateOut]
    next_cursor: str | None


class TemplateVersionPage(Out):
    data: list[TemplateVersionOut]
    next_cursor: str | None


class TemplatePreviewRecipient(Schema):
    external_id: ExternalId | None = None
    email: Annotated[Text, Field(max_length=320)] | None = None
    phone: Annotated[Text, Field(max_length=32)] | None = None
    name: Annotated[Text, Field(max_length=200)] | None = None
    locale: Annotated[Text, Field(max_length=35)] | None = None
    timezone: Annotated[Text, Field(max_length=64)] | None = None
    attributes: JsonObject | None = None


class TemplatePreviewIn(Schema):
    data: JsonObject = Field(default_factory=dict, description="Sample `data` for the send.")
    recipient: TemplatePreviewRecipient | None = Field(
        default=None, description="An inline recipient (or name a stored one in `external_id`)."
    )
    external_id: ExternalId | None = None
    version: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Default: the latest version."
    )


class TemplatePreviewOut(Out):
    version: int
    channels: dict[str, dict[str, Any]]


def _summaries(templates: list[Template]) -> list[dict[str, Any]]:
    if not templates:
        return []
    ids = [t.id for t in templates]
    category_ids = {t.category_id for t in templates if t.category_id is not None}
    categories = values_by_id(Category.id, Category.key, category_ids)
    latest = dict(
        db.session.execute(
            select(TemplateVersion.template_id, func.max(TemplateVersion.version))
            .where(TemplateVersion.template_id.in_(ids))
            .group_by(TemplateVersion.template_id)
        ).all()
    )
    published_ids = [t.published_version_id for t in templates if t.published_version_id]
    published = (
        dict(
            db.session.execute(
                select(TemplateVersion.id, TemplateVersion.version).where(
                    TemplateVersion.id.in_(published_ids)
                )
            ).all()
        )
        if published_ids
        else {}
    )
    return [
        {
            "key": t.key,
            "name": t.name,
            "description": t.description or "",
            "category": categories.get(t.category_id),
            "published_version": published.get(t.published_version_id),
            "latest_version": latest.get(t.id, 0),
            "created_at": t.created_at,
            "updated_at": t.updated_at,
        }
        for t in templates
    ]


def _detail(template: Template) -> TemplateDetailOut:
    (summary,) = _summaries([template])
    published = services.published_version(template)
    draft = services.latest_draft(template)
    return TemplateDetailOut(
        **summary,
        published=TemplateVersionOut.of(published) if published else None,
        draft=TemplateVersionOut.of(draft) if draft else None,
    )


@endpoint(
    bp,
    "POST",
    "/templates",
    summary="Create a template (with a draft version 1)",
    tags=TAGS,
    scope="templates:write",
    body=TemplateIn,
    response=TemplateDetailOut,
    status=201,
    idempotent=True,
    errors=[409],
)
def create_template(body: TemplateIn) -> TemplateDetailOut:
    """The content is saved as draft version 1; publish it before sending. A 409 when the
    key is taken."""
    template = services.create_template(
        body.key,
        body.name,
        body.channels.content(),
        description=body.description,
        category=body.category,
        actor=current_actor(),
    )
    return _detail(template)


@endpoint(
    bp,
    "GET",
    "/templates",
    summary="List templates, newest first",
    tags=TAGS,
    scope="templates:read",
    query=PageQuery,
    response=TemplatePage,
)
def list_templates(query: PageQuery) -> TemplatePage:
    rows, cursor = page(select(Template), Template.id, limit=query.limit, cursor=query.cursor)
    return TemplatePage(
        data=[TemplateOut(**s) for s in _summaries(rows)],
        next_cursor=cursor,
    )


@endpoint(
    bp,
    "GET",
    "/templates/{key}",
    summary="Get a template with its published version and latest draft",
    tags=TAGS,
    scope="templates:read",
    response=TemplateDetailOut,
)
def show_template(key: str) -> TemplateDetailOut:
    return _detail(services.get_template(key))


@endpoint(
    bp,
    "PATCH",
    "/templates/{key}",
    summary="Change a template; new content becomes a new draft version",
    tags=TAGS,
    scope="templates:write",
    body=TemplatePatch,
    response=TemplateDetailOut,
)
def update_template(key: str, body: TemplatePatch) -> TemplateDetailOut:
    """Only the fields sent change. `channels` replaces the content of every channel in a
    new draft version; the published version is untouched until the next publish."""
    changes = body.model_dump(exclude_unset=True, exclude={"channels"})
    if "channels" in body.model_fields_set:
        changes["content"] = body.channels.content()
    template = services.update_template(key, changes, actor=current_actor())
    return _detail(template)


@endpoint(
    bp,
    "POST",
    "/templates/{key}/publish",
    summary="Publish the latest draft",
    tags=TAGS,
    scope="templates:write",
    response=TemplateDetailOut,
    errors=[409, 422],
)
def publish_template(key: str) -> TemplateDetailOut:
    """Every field must compile in the sandbox and use only `recipient`, `data`,
    `organization`, `unsubscribe_url` and `preferences_url`; otherwise a 422 names each field
    (`channels.email.subject`) with the Jinja line. A 409 when there is no new draft."""
    return _detail(services.publish_template(key, actor=current_actor()))


@endpoint(
    bp,
    "GET",
    "/templates/{key}/versions",
    summary="List a template's versions, newest first",
    tags=TAGS,
    scope="templates:read",
    query=PageQuery,
    response=TemplateVersionPage,
)
def list_template_versions(key: str, query: PageQuery) -> TemplateVersionPage:
    template = services.get_template(key)
    rows, cursor = page(
        select(TemplateVersion).where(TemplateVersion.template_id == template.id),
        TemplateVersion.id,
        limit=query.limit,
        cursor=query.cursor,
    )
    return TemplateVersionPage(data=[TemplateVersionOut.of(v) for v in rows], next_cursor=cursor)


@endpoint(
    bp,
    "POST",
    "/templates/{key}/preview",
    summary="Render a template with sample data",
    tags=TAGS,
    scope="templates:read",
    body=TemplatePreviewIn,
    response=TemplatePreviewOut,
)
def preview_template(key: str, body: TemplatePreviewIn) -> TemplatePreviewOut:
    """Renders every channel of a version (the latest by default) for an inline recipient,
    a stored one (`external_id`) or a blank one. A field that fails to render is a 422
    naming it (`channels.sms.text`)."""
    if body.recipient is not None and body.external_id is not None:
        raise ValidationError.single("external_id", "Send `recipient` or `external_id`, not both.")
    preview = services.preview_template(
        key,
        data=body.data,
        recipient=body.recipient.model_dump() if body.recipient else None,
        external_id=body.external_id,
        version=body.version,
        base_url=current_app.config.get("WHISTLE_BASE_URL", ""),
    )
    return TemplatePreviewOut(version=preview.version, channels=preview.channels)


@endpoint(
    bp,
    "DELETE",
    "/templates/{key}",
    summary="Delete a template and its versions",
    tags=TAGS,
    scope="templates:write",
    status=204,
    errors=[409],
)
def delete_template(key: str) -> None:
    """A 409 while a campaign uses the template, or once it was sent (the send history
    refers to it)."""
    services.delete_template(key, actor=current_actor())
