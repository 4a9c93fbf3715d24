"""Organizations (tenants) and their audit log."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import ARRAY, Identity, Index, LargeBinary, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from whistle_web.db import TimestampMixin, str_enum
from whistle_web.extensions import db
from whistle_web.tenancy import TenantScoped


class Organization(TimestampMixin, db.Model):
    __tablename__ = "organizations"

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    slug: Mapped[str] = mapped_column(String(80), unique=True)
    # Branding, sender defaults and the email layout: see the settings pages.
    settings: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # Origins allowed to embed the in-app widget (checked on CORS and the socket's Origin).
    allowed_origins: Mapped[list[str]] = mapped_column(
        ARRAY(Text), server_default=text("'{}'::text[]")
    )
    # Secret the customer's backend uses to mint recipient tokens; encrypted at rest.
    widget_secret_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)

    def __repr__(self) -> str:
        return f"<Organization {self.id} {self.slug}>"


class ActorType(enum.StrEnum):
    USER = "user"
    API_KEY = "api_key"
    SYSTEM = "system"


class AuditLog(TenantScoped, db.Model):
    """Who changed what, from the console, the API or the system. Rows are never updated."""

    __tablename__ = "audit_logs"
    __tenant_index__ = False
    __table_args__ = (Index("ix_audit_logs_org_created", "organization_id", "created_at"),)

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    actor_type: Mapped[ActorType] = mapped_column(str_enum(ActorType, "audit_actor_type"))
    actor_id: Mapped[int | None]
    # Kept as text so the entry stays readable after the actor is deleted.
    actor_label: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(80))
    target_type: Mapped[str] = mapped_column(String(80))
    target_id: Mapped[str | None] = mapped_column(String(120))
    changes: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    ip_address: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
