"""Campaigns: a template sent to an audience on some channels, once or on a schedule."""

from __future__ import annotations

import enum
from datetime import datetime, time
from typing import Any

from sqlalchemy import (
    ARRAY,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from whistle_web.db import TimestampMixin, str_enum
from whistle_web.extensions import db
from whistle_web.tenancy import TenantScoped


class CampaignStatus(enum.StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


CAMPAIGN_TRANSITIONS: dict[CampaignStatus, frozenset[CampaignStatus]] = {
    CampaignStatus.DRAFT: frozenset(
        {CampaignStatus.SCHEDULED, CampaignStatus.SENDING, CampaignStatus.CANCELLED}
    ),
    CampaignStatus.SCHEDULED: frozenset(
        {CampaignStatus.DRAFT, CampaignStatus.SENDING, CampaignStatus.CANCELLED}
    ),
    CampaignStatus.SENDING: frozenset(
        {
            CampaignStatus.PAUSED,
            CampaignStatus.COMPLETED,
            CampaignStatus.CANCELLED,
            CampaignStatus.FAILED,
            # A recurring campaign waits for its next run between runs.
            CampaignStatus.SCHEDULED,
        }
    ),
    CampaignStatus.PAUSED: frozenset({CampaignStatus.SENDING, CampaignStatus.CANCELLED}),
    CampaignStatus.COMPLETED: frozenset(),
    CampaignStatus.CANCELLED: frozenset(),
    CampaignStatus.FAILED: frozenset(),
}


class AudienceType(enum.StrEnum):
    SEGMENT = "segment"
    TOPIC = "topic"
    LIST = "list"
    ALL = "all"


class Campaign(TenantScoped, TimestampMixin, db.Model):
    __tablename__ = "campaigns"
    __tenant_index__ = False
    __table_args__ = (
        Index("ix_campaigns_org_status", "organization_id", "status"),
        # The scheduler tick looks for due campaigns across organizations.
        Index(
            "ix_campaigns_due",
            "next_run_at",
            postgresql_where=text("status = 'scheduled'"),
        ),
        CheckConstraint(
            "(audience_type = 'segment') = (segment_id IS NOT NULL)", name="segment_audience"
        ),
        CheckConstraint(
            "(audience_type = 'topic') = (topic_id IS NOT NULL)", name="topic_audience"
        ),
    )

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[CampaignStatus] = mapped_column(
        str_enum(CampaignStatus, "campaign_status"), server_default=CampaignStatus.DRAFT.value
    )
    template_id: Mapped[int] = mapped_column(ForeignKey("templates.id", ondelete="RESTRICT"))
    # The version frozen at launch; edits to the template afterwards do not change the send.
    template_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("template_versions.id", ondelete="RESTRICT")
    )
    channels: Mapped[list[str]] = mapped_column(ARRAY(Text))
    audience_type: Mapped[AudienceType] = mapped_column(str_enum(AudienceType, "audience_type"))
    segment_id: Mapped[int | None] = mapped_column(ForeignKey("segments.id", ondelete="RESTRICT"))
    topic_id: Mapped[int | None] = mapped_column(ForeignKey("topics.id", ondelete="RESTRICT"))
    # Pasted external ids for a LIST audience.
    audience_external_ids: Mapped[list[str]] = mapped_column(
        ARRAY(Text), server_default=text("'{}'::text[]")
    )
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    send_at: Mapped[datetime | None]
    # Send at this wall-clock time in each recipient's own timezone.
    local_send_time: Mapped[time | None]
    cron: Mapped[str | None] = mapped_column(String(120))
    cron_timezone: Mapped[str] = mapped_column(String(64), server_default="UTC")
    next_run_at: Mapped[datetime | None]
    audience_count: Mapped[int | None]
    launched_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))

    def can_become(self, status: CampaignStatus) -> bool:
        return status in CAMPAIGN_TRANSITIONS[self.status]
