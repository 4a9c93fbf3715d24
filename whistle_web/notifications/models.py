"""Send requests (what was asked) and notifications (one message to one recipient)."""

from __future__ import annotations

import enum
from datetime import datetime, time
from typing import Any

from sqlalchemy import ARRAY, ForeignKey, Identity, Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from whistle_web.db import str_enum
from whistle_web.extensions import db
from whistle_web.tenancy import TenantScoped


class SendRequestKind(enum.StrEnum):
    TRIGGER = "trigger"
    CAMPAIGN = "campaign"


class SendRequestStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for send_at
    PLANNING = "planning"  # the planner is resolving the audience in batches
    PLANNED = "planned"  # every notification and delivery is written
    CANCELLED = "cancelled"
    FAILED = "failed"


class SendRequest(TenantScoped, db.Model):
    """A trigger or a campaign run: written in the request, planned by a worker."""

    __tablename__ = "send_requests"
    # (organization_id, id) below serves the organization's rows and their newest-first
    # listing (GET /notifications): no single-column index beside it.
    __tenant_index__ = False
    # The INSERT returns the server defaults (status, created_at, ...): the API's answer
    # needs them, and reading them back after the commit would cost another query.
    __mapper_args__ = {"eager_defaults": True}
    __table_args__ = (
        Index(
            "uq_send_requests_idempotency",
            "organization_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        # The scheduler tick picks up due requests across organizations.
        Index(
            "ix_send_requests_due",
            "send_at",
            postgresql_where=text("status IN ('pending', 'planning')"),
        ),
        Index("ix_send_requests_campaign", "campaign_id"),
        Index("ix_send_requests_organization_id_id", "organization_id", "id"),
    )

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    kind: Mapped[SendRequestKind] = mapped_column(str_enum(SendRequestKind, "send_request_kind"))
    status: Mapped[SendRequestStatus] = mapped_column(
        str_enum(SendRequestStatus, "send_request_status"),
        server_default=SendRequestStatus.PENDING.value,
    )
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    template_id: Mapped[int] = mapped_column(ForeignKey("templates.id", ondelete="RESTRICT"))
    template_version_id: Mapped[int] = mapped_column(
        ForeignKey("template_versions.id", ondelete="RESTRICT")
    )
    # {"type": "recipients", "ids": [...]} | {"type": "topic", "id": N} | {"type": "segment", ...}
    audience: Mapped[dict[str, Any]]
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    channels: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # The API request that made it (SHA-256 of method, path and body, hex), when it came
    # with an Idempotency-Key: a retry with the key must be the same request.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    send_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    # Deliver at this wall-clock time in each recipient's own timezone (on or after send_at).
    local_send_time: Mapped[time | None]
    # Keyset position of the planner: recipients with id <= cursor are planned.
    cursor_recipient_id: Mapped[int] = mapped_column(server_default="0")
    # Audience snapshot bound: recipients created after launch have larger ids.
    max_recipient_id: Mapped[int | None]
    planned_count: Mapped[int] = mapped_column(server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    planned_at: Mapped[datetime | None]
    # Set by the planner as it works; a stale one while planning means it died.
    heartbeat_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]

    # Not a column: set on the send request a trigger returns when an idempotency key had
    # already made it (see notifications.services.trigger).
    replayed = False


class Notification(TenantScoped, db.Model):
    """One logical message to one recipient; it has a delivery per channel."""

    __tablename__ = "notifications"
    __table_args__ = (
        # One notification per recipient per send request, even when planning is retried.
        Index(
            "uq_notifications_request_recipient",
            "send_request_id",
            "recipient_id",
            unique=True,
        ),
        # The recipient's timeline and inbox, newest first (also serves erasure's SET NULL).
        Index("ix_notifications_recipient", "recipient_id", "id"),
    )
    # A broadcast writes one row per recipient: the organization, campaign and template are
    # copies of the send request's, whose foreign keys (organization and campaign cascade,
    # template restricts) already hold them, so they are not checked again row by row.
    __tenant_fk__ = False
    # Every read narrows by id, send request or recipient (with the tenant condition added),
    # never by organization alone: an index on it was one more entry per planned recipient.
    __tenant_index__ = False

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    # No per-row foreign key (its check was ~4 µs of every planned recipient): the planner
    # only writes notifications of the request it holds, and deleting send requests deletes
    # their notifications through a statement-level trigger (migration 0011).
    send_request_id: Mapped[int]
    campaign_id: Mapped[int | None]
    template_id: Mapped[int | None]
    category_id: Mapped[int | None] = mapped_column(
        ForeignKey("categories.id", ondelete="SET NULL")
    )
    # NULL once the recipient is erased (recipients.services.erase_recipient), so the counts
    # stay. No foreign key: its check cost ~4 µs for every planned recipient. The planner
    # reads its recipients FOR KEY SHARE, so an erasure waits for a planner that holds one
    # and then anonymises what it wrote.
    recipient_id: Mapped[int | None]
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
