"""Providers: a channel integration with credentials encrypted at rest."""

from __future__ import annotations

from typing import Any

from sqlalchemy import CheckConstraint, Identity, Index, LargeBinary, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from whistle_web import crypto
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.db import TimestampMixin, str_enum
from whistle_web.extensions import db
from whistle_web.tenancy import TenantScoped


class Provider(TenantScoped, TimestampMixin, db.Model):
    __tablename__ = "providers"
    __tenant_index__ = False
    __table_args__ = (
        UniqueConstraint("organization_id", "name"),
        # Failover walks a channel's enabled providers by priority.
        Index("ix_providers_org_channel_priority", "organization_id", "channel", "priority"),
        # 'Infinity' (and NaN, which PostgreSQL sorts above it) would break the token bucket.
        CheckConstraint(
            "rate_limit_per_second IS NULL"
            " OR (rate_limit_per_second > 0 AND rate_limit_per_second < 'Infinity')",
            name="rate_limit_positive",
        ),
    )

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    channel: Mapped[Channel] = mapped_column(str_enum(Channel, "provider_channel"))
    kind: Mapped[ProviderKind] = mapped_column(str_enum(ProviderKind, "provider_kind"))
    name: Mapped[str] = mapped_column(String(200))
    # Settings safe to show back (sender address, region, host); never secrets.
    settings: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # Envelope-encrypted JSON of the secrets; write-only through the API and console.
    credentials_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    priority: Mapped[int] = mapped_column(server_default="100")
    rate_limit_per_second: Mapped[float | None]
    enabled: Mapped[bool] = mapped_column(server_default="true")

    def set_credentials(self, credentials: dict[str, Any]) -> None:
        self.credentials_encrypted = crypto.encrypt_json(credentials)

    def get_credentials(self) -> dict[str, Any]:
        return crypto.decrypt_json(self.credentials_encrypted)
