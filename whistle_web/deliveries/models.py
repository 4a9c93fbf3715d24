"""Deliveries (the per-recipient ledger), their batches, events and funnel counters."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    Sequence,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, validates

from whistle_web.channels.kinds import Channel
from whistle_web.db import str_enum
from whistle_web.deliveries.failures import FailureReason
from whistle_web.deliveries.status import DeliveryStatus, SuppressionCause, can_transition
from whistle_web.extensions import db
from whistle_web.tenancy import TenantScoped

# Inbox sequence numbers: one PostgreSQL sequence for every recipient, so a recipient's numbers
# strictly increase without being dense. Drawn when an in-app delivery is sent and on each of
# its state changes; the widget resumes with "everything after the last number I saw".
INBOX_SEQ = Sequence("inbox_seq", metadata=db.metadata)


class InvalidTransition(ValueError):
    """Raised when code tries to move a delivery backwards in the ledger."""


class Delivery(TenantScoped, db.Model):
    """One notification on one channel through one provider."""

    __tablename__ = "deliveries"
    __tenant_index__ = False
    # The organization, campaign, template and batch are copies of the notification's and
    # its send request's, whose foreign keys hold them (a deleted organization or campaign
    # cascades through send_requests and notifications; templates with sends cannot be
    # deleted; batches go only with their send request): not checked again for each of a
    # broadcast's rows (measured: 7 of 13 per-row checks, ~40% of planning's insert time).
    __tenant_fk__ = False
    __table_args__ = (
        UniqueConstraint("notification_id", "channel"),
        # Workers claim a batch's queued rows with FOR UPDATE SKIP LOCKED; the sweeper looks
        # for rows left sending. Sent rows leave the index (one index write fewer each).
        Index(
            "ix_deliveries_batch_open",
            "batch_id",
            "id",
            postgresql_where=text("status IN ('queued', 'sending')"),
        ),
        # Funnels and campaign pages filter by campaign, channel and status. Ids are global,
        # so these need no organization prefix (the tenant filter is added on top), and
        # cascades from campaigns and recipients can use them.
        Index("ix_deliveries_campaign", "campaign_id", "channel", "status"),
        # The recipient's story, newest first.
        Index("ix_deliveries_recipient", "recipient_id", "id"),
        # Listing and time filters.
        Index("ix_deliveries_org_created", "organization_id", "created_at"),
        # Provider callbacks (SES, Twilio) find the delivery by the provider's message id.
        Index(
            "ix_deliveries_provider_message",
            "provider_message_id",
            postgresql_where=text("provider_message_id IS NOT NULL"),
        ),
        # Deliveries held back by quiet hours or a backoff, found by the scheduler tick.
        Index(
            "ix_deliveries_not_before",
            "not_before",
            postgresql_where=text("status = 'queued' AND not_before IS NOT NULL"),
        ),
        # A recipient's inbox: resume after a sequence number, newest-first pages.
        Index(
            "ix_deliveries_inbox",
            "recipient_id",
            "inbox_seq",
            postgresql_where=text("channel = 'in_app'"),
        ),
    )

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    # No per-row foreign key, as for Notification.send_request_id: the delivery is written in
    # the statement that writes its notification, and deleting notifications deletes their
    # deliveries through a statement-level trigger (migration 0011).
    notification_id: Mapped[int]
    # NULL once the recipient is erased; no foreign key, as for Notification.recipient_id.
    recipient_id: Mapped[int | None]
    campaign_id: Mapped[int | None]
    template_id: Mapped[int | None]
    batch_id: Mapped[int | None]
    channel: Mapped[Channel] = mapped_column(str_enum(Channel, "delivery_channel"))
    # The provider that took it. No foreign key (a check per planned in-app item): a deleted
    # provider's id stays, and the recipient's story shows it as deleted.
    provider_id: Mapped[int | None]
    status: Mapped[DeliveryStatus] = mapped_column(
        str_enum(DeliveryStatus, "delivery_status"), server_default=DeliveryStatus.QUEUED.value
    )
    suppression_reason: Mapped[SuppressionCause | None] = mapped_column(
        str_enum(SuppressionCause, "delivery_suppression_reason")
    )
    # Why it ended failed or bounced (deliveries/failures.py); the funnel counts it.
    failure_reason: Mapped[FailureReason | None] = mapped_column(
        str_enum(FailureReason, "delivery_failure_reason")
    )
    # Address at send time: email, phone, device token or webhook URL.
    address: Mapped[str | None] = mapped_column(Text)
    provider_message_id: Mapped[str | None] = mapped_column(String(255))
    # The message as sent (subject, bodies), kept for the recipient's story.
    rendered: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(server_default="0")
    # Not to be sent before this time (quiet hours, local-time sends, retry backoff).
    not_before: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    updated_at: Mapped[datetime] = mapped_column(
        server_default=text("now()"), onupdate=text("now()")
    )
    sent_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    seen_at: Mapped[datetime | None]
    read_at: Mapped[datetime | None]
    clicked_at: Mapped[datetime | None]
    archived_at: Mapped[datetime | None]
    # In-app only: this item's latest inbox sequence number (see INBOX_SEQ).
    inbox_seq: Mapped[int | None] = mapped_column(BigInteger)
    failed_at: Mapped[datetime | None]
    bounced_at: Mapped[datetime | None]

    @validates("status")
    def _check_status(self, key: str, value: DeliveryStatus | str) -> DeliveryStatus:
        new = DeliveryStatus(value)
        old = self.status
        if old is not None and not can_transition(old, new):
            raise InvalidTransition(f"delivery {self.id} cannot move from {old} to {new}")
        return new


class BatchStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"


class DeliveryBatch(TenantScoped, db.Model):
    """Deliveries of one send request on one channel handled by one job.

    A batch without a channel is a planning slice: its job plans the request's recipients
    with ids in (``first_recipient_id``, ``last_recipient_id``] in one transaction, so the
    slices of a large send are planned by all workers at once (see planner.plan).
    """

    __tablename__ = "delivery_batches"
    __table_args__ = (
        CheckConstraint(
            "(channel IS NULL) = (last_recipient_id IS NOT NULL)", name="channel_or_slice"
        ),
        Index("ix_delivery_batches_send_request", "send_request_id"),
        # The sweeper re-enqueues batches whose job vanished.
        Index(
            "ix_delivery_batches_open",
            "enqueued_at",
            postgresql_where=text("status <> 'done'"),
        ),
    )

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    send_request_id: Mapped[int] = mapped_column(ForeignKey("send_requests.id", ondelete="CASCADE"))
    channel: Mapped[Channel | None] = mapped_column(str_enum(Channel, "batch_channel"))
    # A planning slice's recipient id range (exclusive, inclusive); NULL for channel batches.
    first_recipient_id: Mapped[int | None] = mapped_column(BigInteger)
    last_recipient_id: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[BatchStatus] = mapped_column(
        str_enum(BatchStatus, "batch_status"), server_default=BatchStatus.PENDING.value
    )
    size: Mapped[int] = mapped_column(server_default="0")
    job_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(server_default="0")
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    enqueued_at: Mapped[datetime | None]
    # Set by the worker while it works through the batch; a stale one means it died.
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class DeliveryEvent(TenantScoped, db.Model):
    """Append-only record of what happened to a delivery; PostgreSQL refuses updates."""

    __tablename__ = "delivery_events"
    __tenant_index__ = False
    __table_args__ = (
        Index("ix_delivery_events_delivery", "delivery_id", "occurred_at"),
        Index("ix_delivery_events_org_occurred", "organization_id", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"))
    # A ledger status, or "complaint", "opened", "unsubscribed", "retry", a custom conversion.
    type: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))


class StatScope(enum.StrEnum):
    ORGANIZATION = "organization"
    CAMPAIGN = "campaign"
    TEMPLATE = "template"


class DeliveryStat(TenantScoped, db.Model):
    """Funnel counters per scope, channel, metric and hour, so funnels never COUNT(*) deliveries.

    Writers add with ``INSERT ... ON CONFLICT DO UPDATE SET value = value + excluded.value``.
    """

    __tablename__ = "delivery_stats"
    __tenant_index__ = False
    __table_args__ = (
        UniqueConstraint(
            "organization_id",
            "scope",
            "scope_id",
            "channel",
            "metric",
            "bucket",
            name="uq_delivery_stats_key",
        ),
    )

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    scope: Mapped[StatScope] = mapped_column(str_enum(StatScope, "stat_scope"))
    # The campaign or template id; the organization id for the ORGANIZATION scope.
    scope_id: Mapped[int]
    channel: Mapped[Channel] = mapped_column(str_enum(Channel, "stat_channel"))
    # "targeted", a ledger status, "suppressed:<reason>", "failed:<reason>",
    # "bounced:<reason>" or "event:<type>".
    metric: Mapped[str] = mapped_column(String(80))
    bucket: Mapped[datetime]
    value: Mapped[int] = mapped_column(server_default="0")


class DeliveryLinkStat(TenantScoped, db.Model):
    """Clicks per scope (campaign or template), channel and link, so the top clicked links
    of a funnel read a row per link, never the click events.

    ``url_hash`` is ``md5(url)`` in hex (the key; URLs may be long). Writers add with
    ``INSERT ... ON CONFLICT DO UPDATE SET clicks = clicks + excluded.clicks``.
    """

    __tablename__ = "delivery_link_stats"
    __tenant_index__ = False
    __table_args__ = (
        UniqueConstraint(
            "organization_id",
            "scope",
            "scope_id",
            "channel",
            "url_hash",
            name="uq_delivery_link_stats_key",
        ),
    )

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    scope: Mapped[StatScope] = mapped_column(str_enum(StatScope, "link_stat_scope"))
    scope_id: Mapped[int]
    channel: Mapped[Channel] = mapped_column(str_enum(Channel, "link_stat_channel"))
    url_hash: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    clicks: Mapped[int] = mapped_column(server_default="0")
