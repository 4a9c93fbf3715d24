"""Topics people subscribe to, and segments defined by rules."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Identity, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from whistle_web.db import TimestampMixin
from whistle_web.extensions import db
from whistle_web.tenancy import TenantScoped


class Topic(TenantScoped, TimestampMixin, db.Model):
    __tablename__ = "topics"
    __tenant_index__ = False
    __table_args__ = (UniqueConstraint("organization_id", "key"),)

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    key: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, server_default="")


class Subscription(TenantScoped, db.Model):
    __tablename__ = "subscriptions"
    __table_args__ = (UniqueConstraint("topic_id", "recipient_id"),)

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    topic_id: Mapped[int] = mapped_column(ForeignKey("topics.id", ondelete="CASCADE"))
    recipient_id: Mapped[int] = mapped_column(
        ForeignKey("recipients.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class Segment(TenantScoped, TimestampMixin, db.Model):
    """A saved rule tree (nested AND/OR groups) compiled to one parameterised query."""

    __tablename__ = "segments"
    __tenant_index__ = False
    __table_args__ = (UniqueConstraint("organization_id", "name"),)

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, server_default="")
    rules: Mapped[dict[str, Any]] = mapped_column(
        server_default=text("""'{"op": "and", "rules": []}'::jsonb""")
    )
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
