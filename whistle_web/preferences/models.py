"""Categories of notifications, recipient preferences and the suppression list."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import ARRAY, ForeignKey, Identity, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from whistle_web.channels.kinds import Channel
from whistle_web.db import TimestampMixin, str_enum
from whistle_web.extensions import db
from whistle_web.tenancy import TenantScoped


class Category(TenantScoped, TimestampMixin, db.Model):
    """A kind of notification (billing, comments, marketing)."""

    __tablename__ = "categories"
    __tenant_index__ = False
    __table_args__ = (UniqueConstraint("organization_id", "key"),)

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    key: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, server_default="")
    default_channels: Mapped[list[str]] = mapped_column(
        ARRAY(Text), server_default=text("'{}'::text[]")
    )
    # Critical categories (security alerts, receipts) ignore preferences and unsubscribe.
    critical: Mapped[bool] = mapped_column(server_default="false")


class Preference(TenantScoped, db.Model):
    """Recipient × (category or every category) × (channel or every channel) → on/off."""

    __tablename__ = "preferences"
    __table_args__ = (
        UniqueConstraint(
            "recipient_id", "category_id", "channel", postgresql_nulls_not_distinct=True
        ),
    )

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    recipient_id: Mapped[int] = mapped_column(ForeignKey("recipients.id", ondelete="CASCADE"))
    category_id: Mapped[int | None] = mapped_column(
        ForeignKey("categories.id", ondelete="CASCADE"), index=True
    )
    channel: Mapped[Channel | None] = mapped_column(str_enum(Channel, "preference_channel"))
    enabled: Mapped[bool]
    updated_at: Mapped[datetime] = mapped_column(
        server_default=text("now()"), onupdate=text("now()")
    )


class SuppressionReason(enum.StrEnum):
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"


class Suppression(TenantScoped, db.Model):
    """An address no message may go to (bounced, complained, or added by staff)."""

    __tablename__ = "suppressions"
    __tenant_index__ = False
    __table_args__ = (UniqueConstraint("organization_id", "channel", "address"),)

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    channel: Mapped[Channel] = mapped_column(str_enum(Channel, "suppression_channel"))
    # Lower-cased email address or E.164 phone number.
    address: Mapped[str] = mapped_column(String(320))
    reason: Mapped[SuppressionReason] = mapped_column(
        str_enum(SuppressionReason, "suppression_reason")
    )
    delivery_id: Mapped[int | None] = mapped_column(
        ForeignKey("deliveries.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
