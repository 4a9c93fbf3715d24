"""Recipients (the customer's end users) and their devices."""

from __future__ import annotations

import enum
from datetime import datetime, time
from typing import Any

from sqlalchemy import ForeignKey, Identity, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from whistle_web.db import TimestampMixin, str_enum
from whistle_web.extensions import db
from whistle_web.tenancy import TenantScoped


class Recipient(TenantScoped, TimestampMixin, db.Model):
    __tablename__ = "recipients"
    __tenant_index__ = False
    __table_args__ = (
        UniqueConstraint("organization_id", "external_id"),
        # Keyset batches of the planner walk (organization_id, id).
        Index("ix_recipients_org_id", "organization_id", "id"),
        Index("ix_recipients_org_email", "organization_id", "email"),
        Index("ix_recipients_org_phone", "organization_id", "phone"),
        # Segment conditions on the sign-up date ("created in the last 90 days").
        Index("ix_recipients_org_created", "organization_id", "created_at"),
        Index(
            "ix_recipients_attributes",
            "attributes",
            postgresql_using="gin",
            postgresql_ops={"attributes": "jsonb_path_ops"},
        ),
    )

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(200))
    locale: Mapped[str | None] = mapped_column(String(35))
    # IANA zone name; quiet hours and local-time sends use it.
    timezone: Mapped[str | None] = mapped_column(String(64))
    attributes: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # Global unsubscribe: set, nothing but critical categories reaches the recipient.
    unsubscribed_at: Mapped[datetime | None]
    quiet_hours_start: Mapped[time | None]
    quiet_hours_end: Mapped[time | None]

    devices: Mapped[list[Device]] = relationship(
        back_populates="recipient", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"<Recipient {self.id} {self.external_id}>"


class DeviceKind(enum.StrEnum):
    FCM = "fcm"
    APNS = "apns"
    WEBPUSH = "webpush"


class Device(TenantScoped, TimestampMixin, db.Model):
    __tablename__ = "devices"
    __tenant_index__ = False
    __table_args__ = (UniqueConstraint("organization_id", "kind", "token"),)

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    recipient_id: Mapped[int] = mapped_column(
        ForeignKey("recipients.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[DeviceKind] = mapped_column(str_enum(DeviceKind, "device_kind"))
    # FCM/APNs registration token, or the Web Push endpoint URL.
    token: Mapped[str] = mapped_column(Text)
    # Web Push subscription keys (p256dh, auth) and client details.
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    last_seen_at: Mapped[datetime | None]
    # Set when a provider says the token is no longer valid.
    disabled_at: Mapped[datetime | None]

    recipient: Mapped[Recipient] = relationship(back_populates="devices")
