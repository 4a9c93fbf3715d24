"""Recipients: upsert by external id, bulk upsert, read, list, erase."""

from __future__ import annotations

from datetime import datetime, time
from typing import Any

from pydantic import EmailStr, Field, field_validator
from sqlalchemy import or_, select

from whistle_web.api import bp
from whistle_web.api.framework import Out, Schema, current_actor, endpoint, page
from whistle_web.errors import NotFound
from whistle_web.extensions import db
from whistle_web.recipients.models import Recipient
from whistle_web.recipients.services import (
    erase_recipient,
    require_valid,
    upsert_recipients,
    validate_profile,
)

TAGS = ["Recipients"]


class RecipientIn(Schema):
    email: EmailStr | None = None
    phone: str | None = Field(default=None, max_length=32, examples=["+14155550100"])
    name: str | None = Field(default=None, max_length=200)
    locale: str | None = Field(default=None, max_length=35)
    timezone: str | None = Field(default=None, max_length=64, examples=["Europe/Berlin"])
    attributes: dict[str, Any] | None = None


class BulkRecipientIn(RecipientIn):
    external_id: str = Field(min_length=1, max_length=255)


class BulkIn(Schema):
    recipients: list[BulkRecipientIn] = Field(min_length=1, max_length=1000)


class RecipientOut(Out):
    external_id: str
    email: str | None
    phone: str | None
    name: str | None
    locale: str | None
    timezone: str | None
    attributes: dict[str, Any]
    unsubscribed: bool
    quiet_hours_start: time | None
    quiet_hours_end: time | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, recipient: Recipient) -> RecipientOut:
        return cls(
            external_id=recipient.external_id,
            email=recipient.email,
            phone=recipient.phone,
            name=recipient.name,
            locale=recipient.locale,
            timezone=recipient.timezone,
            attributes=recipient.attributes or {},
            unsubscribed=recipient.unsubscribed_at is not None,
            quiet_hours_start=recipient.quiet_hours_start,
            quiet_hours_end=recipient.quiet_hours_end,
            created_at=recipient.created_at,
            updated_at=recipient.updated_at,
        )


class BulkItemOut(Out):
    index: int
    external_id: str
    ok: bool
    errors: list[dict[str, str]] = []


class BulkOut(Out):
    created_or_updated: int
    failed: int
    results: list[BulkItemOut]


class RecipientPage(Out):
    data: list[RecipientOut]
    next_cursor: str | None


class ListQuery(Schema):
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = None
    email: str | None = None
    phone: str | None = None
    search: str | None = Field(default=None, max_length=200)

    @field_validator("search")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        return value or None


def get_recipient(external_id: str) -> Recipient:
    recipient = db.session.scalar(select(Recipient).where(Recipient.external_id == external_id))
    if recipient is None:
        raise NotFound(f"No recipient {external_id!r}.")
    return recipient


@endpoint(
    bp,
    "PUT",
    "/recipients/{external_id}",
    summary="Create or update a recipient",
    tags=TAGS,
    scope="recipients:write",
    body=RecipientIn,
    response=RecipientOut,
)
def put_recipient(external_id: str, body: RecipientIn) -> RecipientOut:
    """Only the fields sent change; `attributes` are merged into the existing ones."""
    profile = {"external_id": external_id, **body.model_dump(exclude_unset=True)}
    require_valid(validate_profile(profile))
    upsert_recipients([profile])
    db.session.commit()
    return RecipientOut.of(get_recipient(external_id))


@endpoint(
    bp,
    "POST",
    "/recipients/bulk",
    summary="Create or update up to 1,000 recipients",
    tags=TAGS,
    scope="recipients:write",
    body=BulkIn,
    response=BulkOut,
    idempotent=True,
)
def bulk_recipients(body: BulkIn) -> BulkOut:
    """Each item is validated on its own: valid items are saved, invalid ones reported."""
    results: list[BulkItemOut] = []
    valid: list[dict[str, Any]] = []
    for index, item in enumerate(body.recipients):
        profile = item.model_dump(exclude_unset=True)
        errors = validate_profile(profile, f"recipients[{index}].")
        results.append(
            BulkItemOut(
                index=index,
                external_id=item.external_id,
                ok=not errors,
                errors=[{"field": e.field, "message": e.message} for e in errors],
            )
        )
        if not errors:
            valid.append(profile)
    if valid:
        upsert_recipients(valid)
        db.session.commit()
    return BulkOut(created_or_updated=len(valid), failed=len(results) - len(valid), results=results)


@endpoint(
    bp,
    "GET",
    "/recipients/{external_id}",
    summary="Get a recipient",
    tags=TAGS,
    scope="recipients:read",
    response=RecipientOut,
)
def show_recipient(external_id: str) -> RecipientOut:
    return RecipientOut.of(get_recipient(external_id))


@endpoint(
    bp,
    "GET",
    "/recipients",
    summary="List recipients, newest first",
    tags=TAGS,
    scope="recipients:read",
    query=ListQuery,
    response=RecipientPage,
)
def list_recipients(query: ListQuery) -> RecipientPage:
    stmt = select(Recipient)
    if query.email:
        stmt = stmt.where(Recipient.email == query.email.strip().lower())
    if query.phone:
        stmt = stmt.where(Recipient.phone == query.phone)
    if query.search:
        term = query.search
        stmt = stmt.where(
            or_(
                Recipient.external_id.icontains(term, autoescape=True),
                Recipient.email.icontains(term, autoescape=True),
                Recipient.name.icontains(term, autoescape=True),
            )
        )
    rows, cursor = page(stmt, Recipient.id, limit=query.limit, cursor=query.cursor)
    return RecipientPage(data=[RecipientOut.of(r) for r in rows], next_cursor=cursor)


@endpoint(
    bp,
    "DELETE",
    "/recipients/{external_id}",
    summary="Erase a recipient",
    tags=TAGS,
    scope="recipients:write",
    status=204,
)
def delete_recipient(external_id: str) -> None:
    """Personal data (profile, devices, preferences, subscriptions) is deleted; deliveries
    stay, anonymised, so funnel counts do not change."""
    recipient = get_recipient(external_id)
    erase_recipient(recipient.id, actor=current_actor())
    db.session.commit()
