"""Tables of the API itself: staff refresh tokens and idempotency records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Identity, Index, LargeBinary, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from whistle_web.extensions import db
from whistle_web.tenancy import TenantScoped


class RefreshToken(TenantScoped, db.Model):
    """A staff refresh token (hashed). Rotated on every use; reuse revokes its family."""

    __tablename__ = "api_refresh_tokens"

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    family: Mapped[str] = mapped_column(String(32), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class IdempotencyRecord(TenantScoped, db.Model):
    """The first response to a POST with an ``Idempotency-Key``, replayed for 24 hours."""

    __tablename__ = "api_idempotency_records"
    __tenant_index__ = False
    __table_args__ = (
        UniqueConstraint("organization_id", "key"),
        Index("ix_api_idempotency_records_created", "created_at"),
    )

    id: Mapped[int] = mapped_column(Identity(), primary_key=True)
    key: Mapped[str] = mapped_column(String(255))
    # SHA-256 of method, path and body: the same key with another request is a conflict.
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None]
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary)
    response_headers: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
