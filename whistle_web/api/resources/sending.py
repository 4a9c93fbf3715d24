"""Sending: trigger notifications, read and cancel them, record events, list deliveries."""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any, Literal

from flask import Response, request
from pydantic import (
    AfterValidator,
    AwareDatetime,
    EmailStr,
    Field,
    PrivateAttr,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from sqlalchemy import func, select

from whistle_web.api import bp, idempotency
from whistle_web.api.framework import (
    Out,
    Schema,
    current_actor,
    endpoint,
    json_response,
    page,
    values_by_id,
)
from whistle_web.channels.kinds import Channel
from whistle_web.deliveries.ledger import record_event
from whistle_web.deliveries.models import Delivery, DeliveryEvent
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.errors import FieldError, InvalidState, NotFound, ValidationError
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template
from whistle_web.notifications.models import (
    Notification,
    SendRequest,
    SendRequestKind,
    SendRequestStatus,
)
from whistle_web.notifications.services import cancel_send_request, trigger
from whistle_web.recipients.models import Recipient

# --- shared field types (also used by the campaigns and settings resources) ----------------


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("Must not contain NUL characters.")
    return value


def _sane_time(value: datetime) -> datetime:
    if not 1970 <= value.year <= 9000:
        raise ValueError("Use a time between the years 1970 and 9000.")
    return value.astimezone(UTC)


def _local_time(value: time) -> time:
    if value.tzinfo is not None:
        raise ValueError("A wall-clock time without offset, e.g. 09:00.")
    return value


# Bodies are checked for NUL characters and NaN by the framework; query strings are not.
Text = Annotated[str, AfterValidator(_no_nul)]
JsonObject = dict[str, Any]
# RFC 3339 with an offset, returned in UTC.
Timestamp = Annotated[AwareDatetime, AfterValidator(_sane_time)]
LocalTime = Annotated[
    time,
    AfterValidator(_local_time),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$",
            "examples": ["09:00"],
            "description": "Wall-clock time in each recipient's own time zone.",
        }
    ),
]
ChannelName = Literal["email", "sms", "push", "in_app", "webhook"]
StatusName = Literal[
    "queued",
    "sending",
    "sent",
    "delivered",
    "seen",
    "read",
    "clicked",
    "suppressed",
    "failed",
    "bounced",
    "cancelled",
]
# Ids are PostgreSQL bigints (the framework turns larger ones in paths into 404s).
MAX_ID = 2**63 - 1


def hhmm(value: time | None) -> str | None:
    return None if value is None else value.strftime("%H:%M")


# --- notifications (send requests) -------------------------------------------------------

TAGS = ["Notifications"]


class RecipientRef(Schema):
    """An external id, or a profile that creates or updates the recipient before sending."""

    external_id: Text = Field(min_length=1, max_length=255)
    email: EmailStr | None = None
    phone: Text | None = Field(default=None, max_length=32, examples=["+14155550100"])
    name: Text | None = Field(default=None, max_length=200)
    locale: Text | None = Field(default=None, max_length=35)
    timezone: Text | None = Field(default=None, max_length=64, examples=["Europe/Berlin"])
    attributes: JsonObject | None = None
    _reference: bool = PrivateAttr(default=False)

    @model_validator(mode="wrap")
    @classmethod
    def _from_external_id(cls, data: Any, handler: Any) -> RecipientRef:
        if isinstance(data, str):
            item = handler({"external_id": data})
            item._reference = True
            return item
        return handler(data)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        profile = dict(target)
        target.clear()
        target["anyOf"] = [
            {"type": "string", "minLength": 1, "maxLength": 255, "description": "An external id"},
            profile,
        ]
        return schema

    def as_trigger_item(self) -> str | dict[str, Any]:
        if self._reference:
            return self.external_id
        return self.model_dump(exclude_unset=True)


class NotificationIn(Schema):
    template: Text = Field(min_length=1, max_length=100, description="The template's key.")
    to: list[RecipientRef] | None = Field(default=None, min_length=1, max_length=10_000)
    topic: Text | None = Field(default=None, min_length=1, max_length=100)
    segment: int | None = Field(default=None, ge=1, le=MAX_ID)
    data: JsonObject | None = None
    channels: list[Channel] | None = Field(default=None, min_length=1, max_length=5)
    send_at: Timestamp | None = None
    local_time: LocalTime | None = None


class DeliverySummary(Out):
    id: int
    channel: str
    status: str
    provider_id: int | None
    error: str | None
    suppression_reason: str | None
    failure_reason: str | None = Field(
        description="Why it failed or bounced: template_error, no_address, recipient_deleted, "
        "no_provider, invalid_address, provider_rejected, gave_up, interrupted, hard_bounce, "
        "provider_suppressed, soft_bounce or other."
    )
    attempts: int
    not_before: datetime | None
    created_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None
    seen_at: datetime | None
    read_at: datetime | None
    clicked_at: datetime | None
    archived_at: datetime | None
    failed_at: datetime | None
    bounced_at: datetime | None

    @classmethod
    def of(cls, d: Delivery) -> DeliverySummary:
        return cls(
            id=d.id,
            channel=str(d.channel),
            status=str(d.status),
            provider_id=d.provider_id,
            error=d.error,
            suppression_reason=None if d.suppression_reason is None else str(d.suppression_reason),
            failure_reason=None if d.failure_reason is None else str(d.failure_reason),
            attempts=d.attempts,
            not_before=d.not_before,
            created_at=d.created_at,
            sent_at=d.sent_at,
            delivered_at=d.delivered_at,
            seen_at=d.seen_at,
            read_at=d.read_at,
            clicked_at=d.clicked_at,
            archived_at=d.archived_at,
            failed_at=d.failed_at,
            bounced_at=d.bounced_at,
        )


class NotificationOut(Out):
    id: int
    send_request_id: int
    campaign_id: int | None
    recipient: str | None = Field(description="External id; null once the recipient is erased.")
    data: dict[str, Any]
    created_at: datetime
    deliveries: list[DeliverySummary]


class NotificationPage(Out):
    data: list[NotificationOut]
    next_cursor: str | None


class DeliveryCounts(Out):
    total: int = 0
    queued: int = 0
    sending: int = 0
    sent: int = 0
    delivered: int = 0
    seen: int = 0
    read: int = 0
    clicked: int = 0
    suppressed: int = 0
    failed: int = 0
    bounced: int = 0
    cancelled: int = 0


class NotificationAccepted(Out):
    id: int = Field(description="The send request's id: GET or DELETE /notifications/{id}.")
    status: str
    template: str
    channels: list[str] | None
    recipients: int | None = Field(
        description="How many recipients `to` named; null for a topic or segment (see "
        "`planned` on GET /notifications/{id})."
    )
    send_at: datetime
    local_time: str | None
    created_at: datetime


class SendRequestSummary(NotificationAccepted):
    kind: str = Field(description="trigger, or campaign (one run of a campaign).")
    campaign_id: int | None
    audience: str = Field(description="recipients, list, topic, segment or all.")
    data: dict[str, Any]
    planned: int = Field(description="Recipients planned so far.")
    planned_at: datetime | None = Field(
        description="When the audience was fixed: every recipient planned, or (large sends) "
        "in a planning slice that a worker plans in parallel; `planned` counts the done."
    )
    cancelled_at: datetime | None
    error: str | None

    @classmethod
    def fields_of(cls, sr: SendRequest, template_key: str) -> dict[str, Any]:
        return {
            **_accepted_fields(sr, template_key),
            "kind": str(sr.kind),
            "campaign_id": sr.campaign_id,
            "audience": str((sr.audience or {}).get("type", "")),
            "data": sr.data or {},
            "planned": sr.planned_count,
            "planned_at": sr.planned_at,
            "cancelled_at": sr.cancelled_at,
            "error": sr.error,
        }


class SendRequestPage(Out):
    data: list[SendRequestSummary]
    next_cursor: str | None


class SendRequestOut(SendRequestSummary):
    counts: DeliveryCounts
    notifications: NotificationPage


SendRequestStatusName = Literal["pending", "planning", "planned", "cancelled", "failed"]


class CreatedWindowPage(Schema):
    """A page of a list filtered by creation time (`since` inclusive, `until` exclusive)."""

    since: Timestamp | None = Field(default=None, description="Created at or after (RFC 3339).")
    until: Timestamp | None = Field(default=None, description="Created before (RFC 3339).")
    limit: int = Field(default=50, ge=1, le=200)
    cursor: Text | None = None

    @model_validator(mode="after")
    def _window(self) -> CreatedWindowPage:
        if self.since and self.until and self.until <= self.since:
            raise ValidationError.single("until", "Must be after since.")
        return self


class SendRequestQuery(CreatedWindowPage):
    template: Text | None = Field(default=None, max_length=100, description="A template's key.")
    status: SendRequestStatusName | None = None
    kind: Literal["trigger", "campaign"] | None = None
    campaign: int | None = Field(default=None, ge=1, le=MAX_ID)


class PageQuery(Schema):
    limit: int = Field(default=50, ge=1, le=200)
    cursor: Text | None = None


class CancelOut(Out):
    cancelled: int


def get_send_request(send_request_id: int) -> SendRequest:
    found = db.session.get(SendRequest, send_request_id)
    if found is None:
        raise NotFound("Notification not found.")
    return found


def _accepted_fields(sr: SendRequest, template_key: str) -> dict[str, Any]:
    audience = sr.audience or {}
    named = len(audience.get("ids", [])) if audience.get("type") == "recipients" else None
    return {
        "id": sr.id,
        "status": str(sr.status),
        "template": template_key,
        "channels": sr.channels,
        "recipients": named,
        "send_at": sr.send_at,
        "local_time": hhmm(sr.local_send_time),
        "created_at": sr.created_at,
    }


def notifications_out(rows: list[Notification]) -> list[NotificationOut]:
    """Notifications with their deliveries and recipients' external ids, in three queries."""
    ids = [n.id for n in rows]
    deliveries: dict[int, list[DeliverySummary]] = defaultdict(list)
    if ids:
        for d in db.session.scalars(
            select(Delivery).where(Delivery.notification_id.in_(ids)).order_by(Delivery.id)
        ):
            deliveries[d.notification_id].append(DeliverySummary.of(d))
    externals = external_ids({n.recipient_id for n in rows if n.recipient_id is not None})
    return [
        NotificationOut(
            id=n.id,
            send_request_id=n.send_request_id,
            campaign_id=n.campaign_id,
            recipient=externals.get(n.recipient_id) if n.recipient_id else None,
            data=n.data or {},
            created_at=n.created_at,
            deliveries=deliveries.get(n.id, []),
        )
        for n in rows
    ]


def external_ids(recipient_ids: set[int]) -> dict[int, str]:
    if not recipient_ids:
        return {}
    return dict(
        db.session.execute(
            select(Recipient.id, Recipient.external_id).where(Recipient.id.in_(recipient_ids))
        ).all()
    )


@endpoint(
    bp,
    "POST",
    "/notifications",
    summary="Send a template to recipients, a topic or a segment",
    tags=TAGS,
    scope="notifications:write",
    body=NotificationIn,
    response=NotificationAccepted,
    status=202,
    idempotent="handler",
)
def create_notification(body: NotificationIn) -> NotificationAccepted | Response:
    """Give exactly one of `to` (external ids, or profiles that are created or updated
    first), `topic` (a key) or `segment` (an id). Nothing is sent during the request: the
    answer is the send request, planned and sent by workers right away or at `send_at`
    (and at `local_time` in each recipient's time zone). The same `Idempotency-Key` within
    24 hours returns the first answer (`Idempotent-Replayed: true`) and sends nothing
    again; with another request it is a 409. A refused trigger (4xx) sends nothing and
    holds no key: a retry is checked again."""
    # The send request holds the key (unique per organization, taken in the trigger's own
    # statement) and the request's fingerprint: no separate API record is claimed before
    # the trigger and answered after it, so a keyed trigger is grouped and costs what an
    # unkeyed one does.
    header = request.headers.get("Idempotency-Key")
    idempotency_key = idempotency.checked_key(header) if header else None
    digest = idempotency.fingerprint(request.get_data(cache=True)) if idempotency_key else None
    sr = trigger(
        body.template,
        to=[item.as_trigger_item() for item in body.to] if body.to else None,
        topic=body.topic,
        segment_id=body.segment,
        data=body.data,
        channels=[c.value for c in body.channels] if body.channels is not None else None,
        send_at=body.send_at,
        local_time=body.local_time,
        idempotency_key=idempotency_key,
        request_hash=digest,
        actor=current_actor(),
    )
    if not sr.replayed:
        return NotificationAccepted(**_accepted_fields(sr, body.template))
    key = body.template
    if sr.request_hash is None:
        # Made without a fingerprint (by a caller of trigger() other than this endpoint, or
        # before fingerprints were kept): nothing to compare; its template may have been
        # asked for by another key.
        key = db.session.scalar(select(Template.key).where(Template.id == sr.template_id)) or key
    elif sr.request_hash != digest:
        raise idempotency.different_request()
    # The first answer again: every field is as the INSERT returned it, the status too.
    first = NotificationAccepted(
        **{**_accepted_fields(sr, key), "status": str(SendRequestStatus.PENDING)}
    )
    return idempotency.replayed(json_response(first, 202))


@endpoint(
    bp,
    "GET",
    "/notifications",
    summary="List send requests (triggers and campaign runs), newest first",
    tags=TAGS,
    scope="notifications:read",
    query=SendRequestQuery,
    response=SendRequestPage,
)
def list_notifications(query: SendRequestQuery) -> SendRequestPage:
    """Filter by template key, status, kind, campaign and creation time (`since` inclusive,
    `until` exclusive). Each item is the send request without its notifications and
    delivery counts: `GET /notifications/{id}` has those."""
    stmt = select(SendRequest)
    if query.template is not None:
        stmt = stmt.where(
            SendRequest.template_id
            == select(Template.id).where(Template.key == query.template).scalar_subquery()
        )
    if query.status is not None:
        stmt = stmt.where(SendRequest.status == SendRequestStatus(query.status))
    if query.kind is not None:
        stmt = stmt.where(SendRequest.kind == SendRequestKind(query.kind))
    if query.campaign is not None:
        stmt = stmt.where(SendRequest.campaign_id == query.campaign)
    if query.since is not None:
        stmt = stmt.where(SendRequest.created_at >= query.since)
    if query.until is not None:
        stmt = stmt.where(SendRequest.created_at < query.until)
    rows, cursor = page(stmt, SendRequest.id, limit=query.limit, cursor=query.cursor)
    keys = values_by_id(Template.id, Template.key, {sr.template_id for sr in rows})
    return SendRequestPage(
        data=[
            SendRequestSummary(**SendRequestSummary.fields_of(sr, keys.get(sr.template_id, "")))
            for sr in rows
        ],
        next_cursor=cursor,
    )


@endpoint(
    bp,
    "GET",
    "/notifications/{id}",
    summary="Get a send request: its status, delivery counts and notifications",
    tags=TAGS,
    scope="notifications:read",
    query=PageQuery,
    response=SendRequestOut,
)
def show_notification(id: int, query: PageQuery) -> SendRequestOut:
    """`notifications` is one page (newest first) of the messages planned so far, each with
    its deliveries; page on with `cursor`."""
    sr = get_send_request(id)
    counts = dict(
        db.session.execute(
            select(Delivery.status, func.count())
            .join(Notification, Notification.id == Delivery.notification_id)
            .where(Notification.send_request_id == sr.id)
            .group_by(Delivery.status)
        ).all()
    )
    by_status = {str(status): n for status, n in counts.items()}
    rows, cursor = page(
        select(Notification).where(Notification.send_request_id == sr.id),
        Notification.id,
        limit=query.limit,
        cursor=query.cursor,
    )
    key = db.session.scalar(select(Template.key).where(Template.id == sr.template_id))
    return SendRequestOut(
        **SendRequestSummary.fields_of(sr, key or ""),
        counts=DeliveryCounts(total=sum(by_status.values()), **by_status),
        notifications=NotificationPage(data=notifications_out(rows), next_cursor=cursor),
    )


@endpoint(
    bp,
    "DELETE",
    "/notifications/{id}",
    summary="Cancel what a send request has not sent yet",
    tags=TAGS,
    scope="notifications:write",
    response=CancelOut,
    errors=[409],
)
def cancel_notification_request(id: int) -> CancelOut:
    """Queued deliveries (including ones waiting for `send_at`, `local_time` or quiet hours)
    are cancelled and planning stops; what was already handed to a provider is not
    recalled. Cancelling twice is harmless. A campaign's run is cancelled through
    `POST /campaigns/{id}/cancel` (409 here)."""
    sr = get_send_request(id)
    if sr.kind == SendRequestKind.CAMPAIGN:
        raise InvalidState("This send belongs to a campaign: cancel the campaign instead.")
    return CancelOut(cancelled=cancel_send_request(sr.id, actor=current_actor()))


@endpoint(
    bp,
    "GET",
    "/recipients/{external_id}/notifications",
    summary="List a recipient's notifications, newest first",
    tags=TAGS,
    scope="notifications:read",
    query=PageQuery,
    response=NotificationPage,
)
def recipient_notifications(external_id: str, query: PageQuery) -> NotificationPage:
    recipient_id = None
    if "\x00" not in external_id:
        recipient_id = db.session.scalar(
            select(Recipient.id).where(Recipient.external_id == external_id)
        )
    if recipient_id is None:
        raise NotFound(f"No recipient {external_id!r}.")
    rows, cursor = page(
        select(Notification).where(Notification.recipient_id == recipient_id),
        Notification.id,
        limit=query.limit,
        cursor=query.cursor,
    )
    return NotificationPage(data=notifications_out(rows), next_cursor=cursor)


# --- events ------------------------------------------------------------------------------

EVENT_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
STANDARD_EVENTS = ("seen", "read", "clicked", "archived", "delivered")
# Names the platform itself records (provider callbacks, tracking links, the pipeline).
RESERVED_EVENTS = frozenset(
    {
        "bounced",
        "complaint",
        "opened",
        "unsubscribed",
        "queued",
        "sending",
        "sent",
        "failed",
        "suppressed",
        "cancelled",
        "retry",
    }
)
FUTURE_SKEW = timedelta(minutes=5)


class EventIn(Schema):
    delivery_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    notification_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    channel: Channel | None = Field(
        default=None, description="With `notification_id`: which of its deliveries."
    )
    type: str = Field(
        pattern=EVENT_NAME.pattern,
        description="seen, read, clicked, archived, delivered, or a custom conversion name.",
        examples=["read", "purchase"],
    )
    occurred_at: Timestamp | None = None
    data: JsonObject | None = None

    @field_validator("type")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_EVENTS:
            raise ValueError(f"{value!r} is recorded by Whistle itself; choose another name.")
        return value


class EventOut(Out):
    delivery_id: int
    notification_id: int
    channel: str
    type: str
    occurred_at: datetime
    status: str = Field(description="The delivery's status after the event.")
    changed: bool = Field(description="False when the event was late or repeated.")


def _target_delivery(body: EventIn) -> Delivery:
    """The addressed delivery, locked for the ledger update (fresh from the database)."""
    if (body.delivery_id is None) == (body.notification_id is None):
        raise ValidationError.single(
            "delivery_id", "Give delivery_id, or notification_id with channel."
        )
    stmt = select(Delivery)
    if body.delivery_id is not None:
        if body.channel is not None:
            raise ValidationError.single("channel", "Only with notification_id.")
        stmt = stmt.where(Delivery.id == body.delivery_id)
    else:
        if body.channel is None:
            raise ValidationError.single("channel", "Name the channel of the notification.")
        stmt = stmt.where(
            Delivery.notification_id == body.notification_id, Delivery.channel == body.channel
        )
    delivery = db.session.scalar(stmt.with_for_update())
    if delivery is None:
        raise NotFound("Delivery not found.")
    return delivery


def _ledger_state(d: Delivery) -> tuple[Any, ...]:
    return (d.status, d.sent_at, d.delivered_at, d.seen_at, d.read_at, d.clicked_at, d.archived_at)


@endpoint(
    bp,
    "POST",
    "/events",
    summary="Record that a delivery was seen, read, clicked, archived, or converted",
    tags=["Events"],
    scope="notifications:write",
    body=EventIn,
    response=EventOut,
    status=202,
    idempotent=True,
    errors=[404],
)
def create_event(body: EventIn) -> EventOut:
    """Address the delivery by `delivery_id`, or by `notification_id` and `channel`. The
    ledger only moves forward: a late event (`delivered` after `read`) is kept in the
    delivery's history and changes nothing else (`changed: false`). A custom name is
    counted in the funnel as a conversion. Send an `Idempotency-Key` to retry safely: a
    replayed custom event is not counted twice."""
    now = datetime.now(UTC)
    if body.occurred_at is not None and body.occurred_at > now + FUTURE_SKEW:
        raise ValidationError([FieldError("occurred_at", "Must not be in the future.")])
    delivery = _target_delivery(body)
    before = _ledger_state(delivery)
    occurred_at = body.occurred_at or now
    record_event(delivery.id, body.type, at=occurred_at, data=body.data)
    db.session.commit()
    return EventOut(
        delivery_id=delivery.id,
        notification_id=delivery.notification_id,
        channel=str(delivery.channel),
        type=body.type,
        occurred_at=occurred_at,
        status=str(delivery.status),
        changed=_ledger_state(delivery) != before,
    )


# --- deliveries --------------------------------------------------------------------------


class DeliveryQuery(CreatedWindowPage):
    recipient: Text | None = Field(default=None, max_length=255, description="External id.")
    campaign: int | None = Field(default=None, ge=1, le=MAX_ID)
    channel: ChannelName | None = None
    status: StatusName | None = None


class DeliveryOut(DeliverySummary):
    notification_id: int
    recipient: str | None = Field(description="External id; null once the recipient is erased.")
    campaign_id: int | None
    template_id: int | None
    address: str | None
    provider_message_id: str | None
    updated_at: datetime


class DeliveryEventOut(Out):
    type: str
    occurred_at: datetime
    data: dict[str, Any]


class DeliveryDetail(DeliveryOut):
    rendered: dict[str, Any] | None = Field(description="The message as sent.")
    events: list[DeliveryEventOut]


class DeliveryPage(Out):
    data: list[DeliveryOut]
    next_cursor: str | None


def _delivery_out(
    d: Delivery, externals: dict[int, str], cls: type[DeliveryOut] = DeliveryOut, **extra: Any
) -> Any:
    summary = DeliverySummary.of(d).model_dump()
    return cls(
        **summary,
        notification_id=d.notification_id,
        recipient=externals.get(d.recipient_id) if d.recipient_id else None,
        campaign_id=d.campaign_id,
        template_id=d.template_id,
        address=d.address,
        provider_message_id=d.provider_message_id,
        updated_at=d.updated_at,
        **extra,
    )


@endpoint(
    bp,
    "GET",
    "/deliveries",
    summary="List deliveries, newest first",
    tags=["Deliveries"],
    scope="notifications:read",
    query=DeliveryQuery,
    response=DeliveryPage,
)
def list_deliveries(query: DeliveryQuery) -> DeliveryPage:
    """Filter by recipient (external id), campaign, channel, status and creation time
    (`since` inclusive, `until` exclusive)."""
    stmt = select(Delivery)
    if query.recipient is not None:
        stmt = stmt.where(
            Delivery.recipient_id
            == select(Recipient.id)
            .where(Recipient.external_id == query.recipient)
            .scalar_subquery()
        )
    if query.campaign is not None:
        stmt = stmt.where(Delivery.campaign_id == query.campaign)
    if query.channel is not None:
        stmt = stmt.where(Delivery.channel == Channel(query.channel))
    if query.status is not None:
        stmt = stmt.where(Delivery.status == DeliveryStatus(query.status))
    if query.since is not None:
        stmt = stmt.where(Delivery.created_at >= query.since)
    if query.until is not None:
        stmt = stmt.where(Delivery.created_at < query.until)
    rows, cursor = page(stmt, Delivery.id, limit=query.limit, cursor=query.cursor)
    externals = external_ids({d.recipient_id for d in rows if d.recipient_id is not None})
    return DeliveryPage(data=[_delivery_out(d, externals) for d in rows], next_cursor=cursor)


@endpoint(
    bp,
    "GET",
    "/deliveries/{id}",
    summary="Get a delivery with its rendered content and event history",
    tags=["Deliveries"],
    scope="notifications:read",
    response=DeliveryDetail,
)
def show_delivery(id: int) -> DeliveryDetail:
    delivery = db.session.get(Delivery, id)
    if delivery is None:
        raise NotFound("Delivery not found.")
    events = db.session.scalars(
        select(DeliveryEvent)
        .where(DeliveryEvent.delivery_id == delivery.id)
        .order_by(DeliveryEvent.occurred_at, DeliveryEvent.id)
        .limit(200)
    ).all()
    externals = external_ids({delivery.recipient_id} if delivery.recipient_id else set())
    return _delivery_out(
        delivery,
        externals,
        DeliveryDetail,
        rendered=delivery.rendered,
        events=[
            DeliveryEventOut(type=e.type, occurred_at=e.occurred_at, data=e.data or {})
            for e in events
        ],
    )
