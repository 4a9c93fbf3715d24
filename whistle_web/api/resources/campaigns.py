"""Campaigns: compose, edit while draft or scheduled, launch, pause, resume, cancel, stats."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import select

from whistle_web.api import bp
from whistle_web.api.framework import Out, Schema, current_actor, endpoint, page
from whistle_web.api.resources.sending import (
    MAX_ID,
    JsonObject,
    LocalTime,
    Text,
    Timestamp,
    hhmm,
)
from whistle_web.audiences.models import Topic
from whistle_web.campaigns.models import AudienceType, Campaign, CampaignStatus
from whistle_web.campaigns.services import (
    cancel_campaign,
    create_campaign,
    launch_campaign,
    pause_campaign,
    resume_campaign,
    update_campaign,
)
from whistle_web.campaigns.services import delete_campaign as delete_campaign_service
from whistle_web.channels.kinds import Channel
from whistle_web.deliveries.models import StatScope
from whistle_web.deliveries.services import funnel
from whistle_web.errors import (
    Actor,
    DomainError,
    NotFound,
    ValidationError,
)
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template

TAGS = ["Campaigns"]
StatusName = Literal["draft", "scheduled", "sending", "paused", "completed", "cancelled", "failed"]
AUDIENCE_FIELDS = ("segment", "topic", "to", "everyone")


class CampaignIn(Schema):
    name: Text = Field(min_length=1, max_length=200)
    template: Text = Field(min_length=1, max_length=100, description="The template's key.")
    channels: list[Channel] = Field(min_length=1, max_length=5)
    segment: int | None = Field(default=None, ge=1, le=MAX_ID, description="A segment id.")
    topic: Text | None = Field(default=None, min_length=1, max_length=100, description="A key.")
    to: list[Text] | None = Field(
        default=None, min_length=1, max_length=10_000, description="External ids."
    )
    everyone: bool = Field(default=False, description="Send to every recipient.")
    send_at: Timestamp | None = None
    cron: Text | None = Field(default=None, max_length=120, examples=["0 9 * * MON"])
    cron_timezone: Text = Field(default="UTC", max_length=64, examples=["Europe/Berlin"])
    local_time: LocalTime | None = None
    data: JsonObject | None = None


class CampaignPatch(Schema):
    """Only the fields sent change; sending one audience field replaces the audience."""

    name: Text | None = Field(default=None, min_length=1, max_length=200)
    template: Text | None = Field(default=None, min_length=1, max_length=100)
    channels: list[Channel] | None = Field(default=None, min_length=1, max_length=5)
    segment: int | None = Field(default=None, ge=1, le=MAX_ID)
    topic: Text | None = Field(default=None, min_length=1, max_length=100)
    to: list[Text] | None = Field(default=None, min_length=1, max_length=10_000)
    everyone: bool | None = None
    send_at: Timestamp | None = None
    cron: Text | None = Field(default=None, max_length=120)
    cron_timezone: Text | None = Field(default=None, max_length=64)
    local_time: LocalTime | None = None
    data: JsonObject | None = None


class CampaignOut(Out):
    id: int
    name: str
    status: str
    template: str | None
    channels: list[str]
    audience: str = Field(description="segment, topic, list or all.")
    segment: int | None
    topic: str | None
    to: list[str]
    data: dict[str, Any]
    send_at: datetime | None
    local_time: str | None
    cron: str | None
    cron_timezone: str
    next_run_at: datetime | None
    audience_count: int | None
    launched_at: datetime | None
    completed_at: datetime | None
    cancelled_at: datetime | None
    created_at: datetime
    updated_at: datetime


class CampaignPage(Out):
    data: list[CampaignOut]
    next_cursor: str | None


class CampaignListQuery(Schema):
    status: StatusName | None = None
    limit: int = Field(default=50, ge=1, le=200)
    cursor: Text | None = None


class FunnelCounts(Out):
    targeted: int = 0
    suppressed: int = 0
    queued: int = Field(default=0, description="Not suppressed: handed to the channel.")
    sent: int = 0
    delivered: int = 0
    seen: int = 0
    read: int = 0
    clicked: int = 0
    failed: int = 0
    bounced: int = 0
    cancelled: int = 0
    archived: int = 0


class FunnelRates(Out):
    """Shares between 0 and 1, or null when the base is zero."""

    sent: float | None = Field(description="sent / queued")
    delivered: float | None = Field(description="delivered / sent")
    seen: float | None = Field(description="seen / sent")
    read: float | None = Field(description="read / sent")
    clicked: float | None = Field(description="clicked / sent")
    failed: float | None = Field(description="failed / queued")
    bounced: float | None = Field(description="bounced / sent")
    conversions: dict[str, float | None] = Field(description="custom event / sent, per event")


class Funnel(FunnelCounts):
    suppressed_by_reason: dict[str, int]
    events: dict[str, int] = Field(description="Custom events (POST /events), per name.")
    rates: FunnelRates


class CampaignStats(Funnel):
    campaign_id: int
    status: str
    channels: dict[str, Funnel]


def get_campaign(campaign_id: int) -> Campaign:
    campaign = db.session.get(Campaign, campaign_id)
    if campaign is None:
        raise NotFound("Campaign not found.")
    return campaign


def campaigns_out(rows: list[Campaign]) -> list[CampaignOut]:
    """Campaigns with their template and topic keys (two queries for the whole page)."""
    templates = _keys(Template, {c.template_id for c in rows})
    topics = _keys(Topic, {c.topic_id for c in rows if c.topic_id is not None})
    return [
        CampaignOut(
            id=c.id,
            name=c.name,
            status=str(c.status),
            template=templates.get(c.template_id),
            channels=list(c.channels or []),
            audience=str(c.audience_type),
            segment=c.segment_id,
            topic=topics.get(c.topic_id) if c.topic_id else None,
            to=list(c.audience_external_ids or []),
            data=c.data or {},
            send_at=c.send_at,
            local_time=hhmm(c.local_send_time),
            cron=c.cron,
            cron_timezone=c.cron_timezone,
            next_run_at=c.next_run_at,
            audience_count=c.audience_count,
            launched_at=c.launched_at,
            completed_at=c.completed_at,
            cancelled_at=c.cancelled_at,
            created_at=c.created_at,
            updated_at=c.updated_at,
        )
        for c in rows
    ]


def _keys(model: Any, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    return dict(db.session.execute(select(model.id, model.key).where(model.id.in_(ids))).all())


def _one(campaign: Campaign) -> CampaignOut:
    return campaigns_out([campaign])[0]


def _audience(values: dict[str, Any]) -> tuple[AudienceType, dict[str, Any]]:
    """The audience named by exactly one of segment, topic, to, everyone.

    Raises:
        ValidationError: at ``to`` when none or several are given.
    """
    given = [name for name in AUDIENCE_FIELDS if values.get(name) not in (None, False)]
    if len(given) != 1:
        raise _invalid("to", "Give exactly one of segment, topic, to or everyone.")
    chosen = given[0]
    if chosen == "segment":
        return AudienceType.SEGMENT, {"segment_id": values["segment"]}
    if chosen == "topic":
        return AudienceType.TOPIC, {"topic_key": values["topic"]}
    if chosen == "to":
        return AudienceType.LIST, {"external_ids": values["to"]}
    return AudienceType.ALL, {}


def _invalid(field_name: str, message: str) -> DomainError:
    return ValidationError.single(field_name, message)


@endpoint(
    bp,
    "POST",
    "/campaigns",
    summary="Create a draft campaign",
    tags=TAGS,
    scope="campaigns:write",
    body=CampaignIn,
    response=CampaignOut,
    status=201,
    idempotent=True,
)
def post_campaign(body: CampaignIn) -> CampaignOut:
    """Give exactly one audience: `segment` (id), `topic` (key), `to` (external ids) or
    `everyone: true`. Nothing is sent until `POST /campaigns/{id}/launch`: then now, at
    `send_at`, or on the `cron` schedule (in `cron_timezone`)."""
    audience, audience_args = _audience(body.model_dump())
    campaign = create_campaign(
        body.name,
        template_key=body.template,
        channels=[c.value for c in body.channels],
        audience_type=audience,
        **audience_args,
        data=body.data,
        send_at=body.send_at,
        local_send_time=body.local_time,
        cron=body.cron,
        cron_timezone=body.cron_timezone,
        actor=current_actor(),
        created_by_id=_user_id(current_actor()),
    )
    return _one(campaign)


def _user_id(actor: Actor) -> int | None:
    return actor.id if actor.type == "user" else None


@endpoint(
    bp,
    "GET",
    "/campaigns",
    summary="List campaigns, newest first",
    tags=TAGS,
    scope="campaigns:read",
    query=CampaignListQuery,
    response=CampaignPage,
)
def list_campaigns(query: CampaignListQuery) -> CampaignPage:
    stmt = select(Campaign)
    if query.status is not None:
        stmt = stmt.where(Campaign.status == CampaignStatus(query.status))
    rows, cursor = page(stmt, Campaign.id, limit=query.limit, cursor=query.cursor)
    return CampaignPage(data=campaigns_out(rows), next_cursor=cursor)


@endpoint(
    bp,
    "GET",
    "/campaigns/{id}",
    summary="Get a campaign",
    tags=TAGS,
    scope="campaigns:read",
    response=CampaignOut,
)
def show_campaign(id: int) -> CampaignOut:
    return campaigns_out([get_campaign(id)])[0]


@endpoint(
    bp,
    "PATCH",
    "/campaigns/{id}",
    summary="Edit a draft or scheduled campaign",
    tags=TAGS,
    scope="campaigns:write",
    body=CampaignPatch,
    response=CampaignOut,
    errors=[409],
)
def patch_campaign(id: int, body: CampaignPatch) -> CampaignOut:
    """409 once the campaign is sending or finished. A scheduled campaign is rescheduled
    with its new settings (it must keep a future `send_at` or a `cron`); `null` clears
    `send_at`, `local_time`, `cron` or `data`."""
    given = body.model_dump(exclude_unset=True)
    changes: dict[str, Any] = {}
    renamed = {"template": "template_key", "local_time": "local_send_time"}
    for name, value in given.items():
        if name not in AUDIENCE_FIELDS:
            changes[renamed.get(name, name)] = value
    if any(name in given for name in AUDIENCE_FIELDS):
        audience, args = _audience(given)
        changes.update(audience_type=audience, **args)
    return _one(update_campaign(id, changes, actor=current_actor()))


@endpoint(
    bp,
    "DELETE",
    "/campaigns/{id}",
    summary="Delete a draft or scheduled campaign that never ran",
    tags=TAGS,
    scope="campaigns:write",
    status=204,
    errors=[409],
)
def delete_campaign(id: int) -> None:
    """409 once it has sent anything (cancel it instead: its history stays)."""
    delete_campaign_service(id, actor=current_actor())


def _transition(
    name: str,
    summary: str,
    service: Callable[..., Campaign],
    doc: str,
    *,
    idempotent: bool = False,
) -> Callable[..., Any]:
    def view(id: int) -> CampaignOut:
        return _one(service(id, actor=current_actor()))

    view.__name__ = f"campaign_{name}"
    view.__doc__ = doc
    return endpoint(
        bp,
        "POST",
        f"/campaigns/{{id}}/{name}",
        summary=summary,
        tags=TAGS,
        scope="campaigns:write",
        response=CampaignOut,
        idempotent=idempotent,
        errors=[409, 422] if name == "launch" else [409],
    )(view)


_transition(
    "launch",
    "Launch a campaign now, at send_at, or on its cron schedule",
    launch_campaign,
    "From draft or scheduled. The template's published version is frozen; 422 when the "
    "template is unpublished or lacks content for a channel, 409 from any other status.",
    idempotent=True,
)
_transition(
    "pause",
    "Pause a sending campaign",
    pause_campaign,
    "Workers stop after the chunk in hand; nothing is lost. 409 unless sending.",
)
_transition(
    "resume",
    "Resume a paused campaign",
    resume_campaign,
    "Continues exactly where the pause stopped. 409 unless paused.",
)
_transition(
    "cancel",
    "Cancel a campaign",
    cancel_campaign,
    "Everything not yet sent is cancelled. 409 once completed, cancelled or failed.",
)


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _funnel(metrics: dict[str, int]) -> Funnel:
    counts = FunnelCounts(**{k: int(metrics.get(k, 0)) for k in FunnelCounts.model_fields})
    reasons = {
        k.partition(":")[2]: int(v) for k, v in metrics.items() if k.startswith("suppressed:")
    }
    events = {k.partition(":")[2]: int(v) for k, v in metrics.items() if k.startswith("event:")}
    rates = FunnelRates(
        sent=_ratio(counts.sent, counts.queued),
        delivered=_ratio(counts.delivered, counts.sent),
        seen=_ratio(counts.seen, counts.sent),
        read=_ratio(counts.read, counts.sent),
        clicked=_ratio(counts.clicked, counts.sent),
        failed=_ratio(counts.failed, counts.queued),
        bounced=_ratio(counts.bounced, counts.sent),
        conversions={name: _ratio(n, counts.sent) for name, n in events.items()},
    )
    return Funnel(**counts.model_dump(), suppressed_by_reason=reasons, events=events, rates=rates)


@endpoint(
    bp,
    "GET",
    "/campaigns/{id}/stats",
    summary="A campaign's funnel, overall and per channel",
    tags=TAGS,
    scope="campaigns:read",
    response=CampaignStats,
)
def campaign_stats(id: int) -> CampaignStats:
    """Counts from the live funnel counters: `targeted` = `suppressed` + `queued`; a step
    counts each delivery once (a click implies it was seen); custom events from
    `POST /events` appear under `events`."""
    campaign = get_campaign(id)
    metrics = funnel(StatScope.CAMPAIGN, campaign.id)
    overall = _funnel(metrics.pop("all"))
    return CampaignStats(
        **overall.model_dump(),
        campaign_id=campaign.id,
        status=str(campaign.status),
        channels={channel: _funnel(values) for channel, values in sorted(metrics.items())},
    )
