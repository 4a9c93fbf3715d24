"""Message templates and their immutable versions."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Identity, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from whistle_web.db import TimestampMixin, str_enum
from whistle_web.extensions import db
from whistle_web.tenancy import TenantScoped


class Template(TenantScoped, TimestampMixin, db.Model):
    __tablename__ = "templates"
    __tenant_index__ = False
    __table_args__ = (UniqueConstraint("organization_id", "key"),)

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    key: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, server_default="")
    category_id: Mapped[int | None] = mapped_column(
        ForeignKey("categories.id", ondelete="SET NULL")
    )
    # The version sends use; None until the first publish.
    published_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("template_versions.id", ondelete="SET NULL", use_alter=True)
    )

    versions: Mapped[list[TemplateVersion]] = relationship(
        back_populates="template",
        foreign_keys="TemplateVersion.template_id",
        order_by="TemplateVersion.version",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )
    published_version: Mapped[TemplateVersion | None] = relationship(
        foreign_keys=[published_version_id], post_update=True
    )


class VersionState(enum.StrEnum):
    DRAFT = "draft"
    PUBLISHED = "published"
    ARCHIVED = "archived"


class TemplateVersion(TenantScoped, db.Model):
    """Per-channel content, e.g. ``{"email": {"subject", "html", "text"}, "sms": {"text"}}``."""

    __tablename__ = "template_versions"
    __table_args__ = (UniqueConstraint("template_id", "version"),)

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("templates.id", ondelete="CASCADE"))
    version: Mapped[int]
    state: Mapped[VersionState] = mapped_column(
        str_enum(VersionState, "template_version_state"), server_default=VersionState.DRAFT.value
    )
    content: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    published_at: Mapped[datetime | None]

    template: Mapped[Template] = relationship(back_populates="versions", foreign_keys=[template_id])

    @property
    def channels(self) -> list[str]:
        return sorted(self.content)
