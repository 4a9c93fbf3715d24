"""Campaigns: compose, launch, pause, resume, cancel, and run on a schedule."""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy import delete, select, update

from whistle_web.audiences.models import Segment, Topic
from whistle_web.campaigns.models import AudienceType, Campaign, CampaignStatus
from whistle_web.deliveries.models import BatchStatus, Delivery, DeliveryBatch
from whistle_web.errors import (
    Actor,
    DomainError,
    FieldError,
    InvalidState,
    NotFound,
    ValidationError,
)
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template, TemplateVersion
from whistle_web.notifications.models import SendRequest, SendRequestKind, SendRequestStatus
from whistle_web.notifications.services import cancel_queued_deliveries, check_channels
from whistle_web.organizations.services import record_audit
from whistle_web.recipients.models import Recipient
from whistle_web.recipients.services import newest_recipient_id, require_valid
from whistle_web.tenancy import organization_scope, require_organization_id, unscoped


def _get(campaign_id: int, *, lock: bool = False) -> Campaign:
    stmt = select(Campaign).where(Campaign.id == campaign_id)
    campaign = db.session.scalar(stmt.with_for_update() if lock else stmt)
    if campaign is None:
        raise NotFound("Campaign not found.")
    return campaign


def _move(campaign: Campaign, status: CampaignStatus) -> None:
    if not campaign.can_become(status):
        raise InvalidState(f"A {campaign.status} campaign cannot become {status}.")
    campaign.status = status


def create_campaign(
    name: str,
    *,
    template_key: str,
    channels: list[str],
    audience_type: AudienceType | str,
    segment_id: int | None = None,
    topic_key: str | None = None,
    external_ids: list[str] | None = None,
    data: dict[str, Any] | None = None,
    send_at: datetime | None = None,
    local_send_time: time | None = None,
    cron: str | None = None,
    cron_timezone: str = "UTC",
    actor: Actor,
    created_by_id: int | None = None,
) -> Campaign:
    """Create a draft campaign. Commits.

    Raises:
        ValidationError: with the field that is wrong.
    """
    require_organization_id()
    errors: list[FieldError] = []
    if not name.strip():
        errors.append(FieldError("name", "Give the campaign a name."))
    template = db.session.scalar(select(Template).where(Template.key == template_key))
    if template is None:
        errors.append(FieldError("template", f"No template with key {template_key!r}."))
    try:
        audience = AudienceType(audience_type)
    except ValueError:
        errors.append(FieldError("audience", "Use segment, topic, list or all."))
        audience = None
    topic_id = None
    if audience == AudienceType.SEGMENT and (
        segment_id is None or db.session.get(Segment, segment_id) is None
    ):
        errors.append(FieldError("segment", "Choose an existing segment."))
    if audience == AudienceType.TOPIC:
        topic_id = db.session.scalar(select(Topic.id).where(Topic.key == (topic_key or "")))
        if topic_id is None:
            errors.append(FieldError("topic", "Choose an existing topic."))
    if audience == AudienceType.LIST and not external_ids:
        errors.append(FieldError("to", "Paste at least one external id."))
    if cron and not croniter.is_valid(cron):
        errors.append(FieldError("cron", "Not a cron expression, e.g. '0 9 * * MON'."))
    try:
        ZoneInfo(cron_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        errors.append(FieldError("cron_timezone", "Not an IANA time zone."))
    if send_at is not None and send_at.tzinfo is None:
        errors.append(FieldError("send_at", "Give a time zone (RFC 3339)."))
    if not channels:
        errors.append(FieldError("channels", "Choose at least one channel."))
    require_valid(errors)
    assert template is not None and audience is not None
    campaign = Campaign(
        name=name.strip(),
        template_id=template.id,
        channels=list(dict.fromkeys(channels)),
        audience_type=audience,
        segment_id=segment_id if audience == AudienceType.SEGMENT else None,
        topic_id=topic_id,
        audience_external_ids=list(dict.fromkeys(external_ids or [])),
        data=data or {},
        send_at=send_at,
        local_send_time=local_send_time,
        cron=cron or None,
        cron_timezone=cron_timezone,
        created_by_id=created_by_id,
    )
    db.session.add(campaign)
    db.session.flush()
    record_audit(actor, "campaign.created", "campaign", campaign.id, {"name": campaign.name})
    db.session.commit()
    return campaign


EDITABLE = (CampaignStatus.DRAFT, CampaignStatus.SCHEDULED)
# What update_campaign takes (the audience as create_campaign takes it).
UPDATABLE = frozenset(
    {
        "name",
        "template_key",
        "channels",
        "audience_type",
        "segment_id",
        "topic_key",
        "external_ids",
        "send_at",
        "local_send_time",
        "cron",
        "cron_timezone",
        "data",
    }
)


def _audience_values(changes: dict[str, Any], errors: list[FieldError]) -> dict[str, Any]:
    try:
        audience = AudienceType(changes["audience_type"])
    except ValueError:
        errors.append(FieldError("audience", "Use segment, topic, list or all."))
        return {}
    values: dict[str, Any] = {
        "audience_type": audience,
        "segment_id": None,
        "topic_id": None,
        "audience_external_ids": [],
    }
    if audience == AudienceType.SEGMENT:
        segment_id = changes.get("segment_id")
        if segment_id is None or db.session.get(Segment, segment_id) is None:
            errors.append(FieldError("segment", "Choose an existing segment."))
        values["segment_id"] = segment_id
    elif audience == AudienceType.TOPIC:
        topic_id = db.session.scalar(
            select(Topic.id).where(Topic.key == (changes.get("topic_key") or ""))
        )
        if topic_id is None:
            errors.append(FieldError("topic", "Choose an existing topic."))
        values["topic_id"] = topic_id
    elif audience == AudienceType.LIST:
        external_ids = list(dict.fromkeys(changes.get("external_ids") or []))
        if not external_ids:
            errors.append(FieldError("to", "Paste at least one external id."))
        values["audience_external_ids"] = external_ids
    return values


def update_campaign(campaign_id: int, changes: dict[str, Any], *, actor: Actor) -> Campaign:
    """Edit a draft or scheduled campaign; a scheduled one is rescheduled. Commits.

    ``changes`` holds only what changes (keys in :data:`UPDATABLE`; ``None`` clears
    ``send_at``, ``local_send_time``, ``cron`` and ``data``). The audience is replaced as a
    whole when ``audience_type`` is given.

    Raises:
        NotFound. InvalidState: not draft or scheduled. ValidationError: the field.
    """
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise ValueError(f"not campaign fields: {', '.join(sorted(unknown))}")
    campaign = _get(campaign_id, lock=True)
    if campaign.status not in EDITABLE:
        raise InvalidState(f"A {campaign.status} campaign cannot be edited.")
    errors: list[FieldError] = []
    values: dict[str, Any] = {}
    if changes.get("name") is not None:
        values["name"] = changes["name"].strip()
        if not values["name"]:
            errors.append(FieldError("name", "Give the campaign a name."))
    if changes.get("template_key") is not None:
        template_id = db.session.scalar(
            select(Template.id).where(Template.key == changes["template_key"])
        )
        if template_id is None:
            errors.append(
                FieldError("template", f"No template with key {changes['template_key']!r}.")
            )
        values["template_id"] = template_id
    if changes.get("channels") is not None:
        values["channels"] = list(dict.fromkeys(str(c) for c in changes["channels"]))
        if not values["channels"]:
            errors.append(FieldError("channels", "Choose at least one channel."))
    if "audience_type" in changes:
        values.update(_audience_values(changes, errors))
    if "send_at" in changes:
        send_at = changes["send_at"]
        if send_at is not None and send_at.tzinfo is None:
            errors.append(FieldError("send_at", "Give a time zone (RFC 3339)."))
        values["send_at"] = send_at
    if "local_send_time" in changes:
        values["local_send_time"] = changes["local_send_time"]
    if "cron" in changes:
        cron = changes["cron"] or None
        if cron and not croniter.is_valid(cron):
            errors.append(FieldError("cron", "Not a cron expression, e.g. '0 9 * * MON'."))
        values["cron"] = cron
    if changes.get("cron_timezone") is not None:
        try:
            ZoneInfo(changes["cron_timezone"])
        except (ZoneInfoNotFoundError, ValueError):
            errors.append(FieldError("cron_timezone", "Not an IANA time zone."))
        values["cron_timezone"] = changes["cron_timezone"]
    if "data" in changes:
        values["data"] = changes["data"] or {}
    require_valid(errors)
    changed = sorted(name for name, value in values.items() if getattr(campaign, name) != value)
    if not changed:
        return campaign
    for name in changed:
        setattr(campaign, name, values[name])
    record_audit(actor, "campaign.updated", "campaign", campaign.id, {"fields": changed})
    if campaign.status == CampaignStatus.SCHEDULED:
        now = datetime.now(UTC)
        if not campaign.cron and (campaign.send_at is None or campaign.send_at <= now):
            db.session.rollback()
            raise ValidationError.single(
                "send_at",
                "A scheduled campaign needs a future send_at or a cron; launch it to send now.",
            )
        try:
            return launch_campaign(campaign.id, actor=actor, now=now)  # reschedules; commits
        except DomainError:
            db.session.rollback()
            raise
    db.session.commit()
    return campaign


def delete_campaign(campaign_id: int, *, actor: Actor) -> None:
    """Delete a draft or scheduled campaign that never ran. Commits.

    Raises:
        NotFound. InvalidState: it has run (cancel it instead: its history stays).
    """
    campaign = _get(campaign_id, lock=True)
    if campaign.status not in EDITABLE or campaign.launched_at is not None:
        raise InvalidState(f"A {campaign.status} campaign that has run cannot be deleted.")
    record_audit(actor, "campaign.deleted", "campaign", campaign.id, {"name": campaign.name})
    db.session.execute(delete(Campaign).where(Campaign.id == campaign.id))
    db.session.commit()


def launch_campaign(campaign_id: int, *, actor: Actor, now: datetime | None = None) -> Campaign:
    """Launch now, or schedule for ``send_at`` / the next cron time. Commits.

    Raises:
        NotFound, InvalidState, ValidationError (template unpublished or channels invalid).
    """
    now = now or datetime.now(UTC)
    campaign = _get(campaign_id, lock=True)
    if campaign.status not in (CampaignStatus.DRAFT, CampaignStatus.SCHEDULED):
        raise InvalidState(f"A {campaign.status} campaign cannot be launched.")
    template = db.session.get(Template, campaign.template_id)
    if template.published_version_id is None:
        raise ValidationError.single("template", "Publish the template before launching.")

    check_channels(
        campaign.channels, db.session.get(TemplateVersion, template.published_version_id)
    )
    campaign.template_version_id = template.published_version_id
    if campaign.cron:
        campaign.next_run_at = next_cron_run(campaign, now)
        campaign.status = CampaignStatus.SCHEDULED
    elif campaign.send_at is not None and campaign.send_at > now:
        campaign.next_run_at = campaign.send_at
        campaign.status = CampaignStatus.SCHEDULED
    else:
        _start_run(campaign, now)
    record_audit(actor, "campaign.launched", "campaign", campaign.id, {"status": campaign.status})
    db.session.commit()
    _enqueue_open_work(campaign)
    return campaign


def next_cron_run(campaign: Campaign, after: datetime) -> datetime:
    zone = ZoneInfo(campaign.cron_timezone or "UTC")
    return croniter(campaign.cron, after.astimezone(zone)).get_next(datetime).astimezone(UTC)


def audience_spec(campaign: Campaign) -> dict[str, Any]:
    """The campaign's audience as a send request records it (what the planner reads)."""
    if campaign.audience_type == AudienceType.SEGMENT:
        return {"type": "segment", "id": campaign.segment_id}
    if campaign.audience_type == AudienceType.TOPIC:
        return {"type": "topic", "id": campaign.topic_id}
    if campaign.audience_type == AudienceType.LIST:
        return {"type": "list", "external_ids": campaign.audience_external_ids}
    return {"type": "all"}


def _start_run(campaign: Campaign, now: datetime) -> SendRequest:
    """Snapshot the audience (by recipient id) and write the run's send request."""
    request = SendRequest(
        kind=SendRequestKind.CAMPAIGN,
        campaign_id=campaign.id,
        template_id=campaign.template_id,
        template_version_id=campaign.template_version_id,
        audience=audience_spec(campaign),
        data=campaign.data,
        channels=campaign.channels,
        send_at=now,
        local_send_time=campaign.local_send_time,
        max_recipient_id=newest_recipient_id(),
    )
    db.session.add(request)
    campaign.status = CampaignStatus.SENDING
    campaign.launched_at = campaign.launched_at or now
    db.session.flush()
    return request


def pause_campaign(campaign_id: int, *, actor: Actor) -> Campaign:
    """Stop sending within one batch; nothing is lost. Commits."""
    campaign = _get(campaign_id, lock=True)
    _move(campaign, CampaignStatus.PAUSED)
    record_audit(actor, "campaign.paused", "campaign", campaign.id)
    db.session.commit()
    return campaign


def resume_campaign(campaign_id: int, *, actor: Actor) -> Campaign:
    """Continue exactly where the pause stopped. Commits, then re-enqueues the open work."""
    campaign = _get(campaign_id, lock=True)
    _move(campaign, CampaignStatus.SENDING)
    record_audit(actor, "campaign.resumed", "campaign", campaign.id)
    db.session.commit()
    _enqueue_open_work(campaign)
    return campaign


def cancel_campaign(campaign_id: int, *, actor: Actor) -> Campaign:
    """Stop the campaign and mark everything not yet sent cancelled. Commits."""
    campaign = _get(campaign_id, lock=True)
    _move(campaign, CampaignStatus.CANCELLED)
    campaign.cancelled_at = datetime.now(UTC)
    campaign.next_run_at = None
    db.session.execute(
        update(SendRequest)
        .where(
            SendRequest.campaign_id == campaign.id,
            SendRequest.status.in_([SendRequestStatus.PENDING, SendRequestStatus.PLANNING]),
        )
        .values(status=SendRequestStatus.CANCELLED, cancelled_at=campaign.cancelled_at)
        .execution_options(synchronize_session=False)
    )
    cancelled = cancel_queued_deliveries(Delivery.campaign_id == campaign.id)
    record_audit(actor, "campaign.cancelled", "campaign", campaign.id, {"cancelled": cancelled})
    db.session.commit()
    return campaign


def _enqueue_open_work(campaign: Campaign) -> None:
    """Enqueue planning and the batches not done yet (jobs are idempotent)."""
    from workers.sending import enqueue_batches, enqueue_planning

    requests = db.session.scalars(
        select(SendRequest).where(
            SendRequest.campaign_id == campaign.id,
            SendRequest.status.in_([SendRequestStatus.PENDING, SendRequestStatus.PLANNING]),
        )
    ).all()
    for request in requests:
        enqueue_planning(request)
    open_batches = db.session.scalars(
        select(DeliveryBatch.id)
        .join(SendRequest, SendRequest.id == DeliveryBatch.send_request_id)
        .where(SendRequest.campaign_id == campaign.id, DeliveryBatch.status != BatchStatus.DONE)
    ).all()
    enqueue_batches(open_batches, campaign=True)


def launch_due_campaigns(now: datetime | None = None, limit: int = 100) -> list[int]:
    """Scheduler tick: start every scheduled campaign whose time has come (all organizations)."""
    now = now or datetime.now(UTC)
    due = db.session.execute(
        unscoped(
            select(Campaign.id, Campaign.organization_id)
            .where(Campaign.status == CampaignStatus.SCHEDULED, Campaign.next_run_at <= now)
            .order_by(Campaign.next_run_at)
            .limit(limit)
        )
    ).all()
    started = []
    for campaign_id, org_id in due:
        with organization_scope(org_id):
            campaign = db.session.scalar(
                select(Campaign)
                .where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.SCHEDULED)
                .with_for_update(skip_locked=True)
            )
            if campaign is None or campaign.next_run_at is None or campaign.next_run_at > now:
                db.session.rollback()
                continue
            _start_run(campaign, now)
            campaign.next_run_at = next_cron_run(campaign, now) if campaign.cron else None
            db.session.commit()
            _enqueue_open_work(campaign)
            started.append(campaign_id)
    return started


# --- the console's pre-launch check and duplicate -------------------------------------------
PREVIEW_SAMPLE = 3


def _check_request(campaign: Campaign) -> SendRequest:
    """A send request as launching now would write it, never added to the session."""
    template = db.session.get(Template, campaign.template_id)
    if template is None or template.published_version_id is None:
        raise ValidationError.single("template", "Publish the template before launching.")
    return SendRequest(
        organization_id=require_organization_id(),
        kind=SendRequestKind.CAMPAIGN,
        campaign_id=campaign.id,
        template_id=campaign.template_id,
        template_version_id=template.published_version_id,
        audience=audience_spec(campaign),
        data=campaign.data or {},
        channels=list(campaign.channels),
        send_at=datetime.now(UTC),
        local_send_time=campaign.local_send_time,
        cursor_recipient_id=0,
    )


def count_campaign_audience(campaign_id: int, **limits: Any) -> Any:
    """What launching now would queue and suppress (:func:`planner.count_audience`).

    Raises:
        NotFound. ValidationError: the template is not published.
    """
    from whistle_web.deliveries.planner import count_audience

    return count_audience(_check_request(_get(campaign_id)), **limits)


def render_samples(campaign_id: int, sample: int = PREVIEW_SAMPLE) -> list[dict[str, Any]]:
    """The message each channel would carry for the audience's first ``sample`` recipients.

    Rendered as the channel workers render (same sandbox, same context; links carry no
    delivery). Each item: ``recipient`` and ``channels`` mapping a channel to its fields,
    or to ``{"error": message}``.

    Raises:
        NotFound. ValidationError: the template is not published.
    """
    from types import SimpleNamespace

    from whistle_web.channels.kinds import Channel
    from whistle_web.deliveries.dispatch import ChannelContext, render_context
    from whistle_web.deliveries.planner import audience_condition
    from whistle_web.message_templates.rendering import RenderError

    request = _check_request(_get(campaign_id))
    recipients = db.session.scalars(
        select(Recipient).where(audience_condition(request)).order_by(Recipient.id).limit(sample)
    ).all()
    contexts = {}
    for channel in request.channels or []:
        try:
            contexts[channel] = ChannelContext.load(request, Channel(channel))
        except ValueError:
            continue
    samples = []
    for recipient in recipients:
        row = SimpleNamespace(
            id=0,
            recipient_id=recipient.id,
            external_id=recipient.external_id,
            email=recipient.email,
            phone=recipient.phone,
            name=recipient.name,
            locale=recipient.locale,
            timezone=recipient.timezone,
            attributes=recipient.attributes,
        )
        rendered: dict[str, dict[str, Any]] = {}
        for channel, context in contexts.items():
            values = render_context(row, context, request.data or {})
            try:
                fields = context.render(values)
                # The organization's email layout, where the dispatcher has one.
                layout = getattr(context, "layout", None)
                if layout is not None and fields.get("html"):
                    fields = {**fields, "html": layout.apply(fields["html"], values)}
            except RenderError as error:
                fields = {"error": str(error)}
            rendered[channel] = fields
        samples.append({"recipient": recipient, "channels": rendered})
    return samples


def estimate_send_seconds(queued: dict[str, int]) -> dict[str, Any]:
    """How long sending takes at each channel's primary provider's rate limit.

    Returns ``{"channels": {channel: {"provider", "rate", "seconds"}}, "seconds": total}``;
    ``rate``/``seconds`` None mean unlimited, and ``provider`` None means no enabled
    provider (the built-in one for in-app). Channels send in parallel: the total is the
    slowest channel's, None when every channel is unlimited.
    """
    from whistle_web.channels.kinds import Channel
    from whistle_web.channels.models import Provider

    channels: dict[str, Any] = {}
    slowest: float | None = None
    for channel, count in queued.items():
        provider = db.session.scalar(
            select(Provider)
            .where(Provider.channel == Channel(channel), Provider.enabled.is_(True))
            .order_by(Provider.priority, Provider.id)
            .limit(1)
        )
        rate = provider.rate_limit_per_second if provider is not None else None
        seconds = count / rate if rate else None
        channels[channel] = {
            "provider": provider.name if provider is not None else None,
            "rate": rate,
            "seconds": seconds,
            "missing": provider is None and channel != Channel.IN_APP.value,
        }
        if seconds is not None:
            slowest = max(slowest or 0.0, seconds)
    return {"channels": channels, "seconds": slowest}


def duplicate_campaign(
    campaign_id: int, *, actor: Actor, created_by_id: int | None = None
) -> Campaign:
    """Copy a campaign's settings into a new draft. Commits.

    Raises:
        NotFound. ValidationError: what the copy can no longer use (a deleted topic).
    """
    source = _get(campaign_id)
    template_key = db.session.scalar(select(Template.key).where(Template.id == source.template_id))
    topic_key = (
        db.session.scalar(select(Topic.key).where(Topic.id == source.topic_id))
        if source.topic_id
        else None
    )
    copy = create_campaign(
        f"Copy of {source.name}"[:200],
        template_key=template_key or "",
        channels=list(source.channels),
        audience_type=source.audience_type,
        segment_id=source.segment_id,
        topic_key=topic_key,
        external_ids=list(source.audience_external_ids or []),
        data=dict(source.data or {}),
        send_at=None,
        local_send_time=source.local_send_time,
        cron=source.cron,
        cron_timezone=source.cron_timezone,
        actor=actor,
        created_by_id=created_by_id,
    )
    record_audit(actor, "campaign.duplicated", "campaign", copy.id, {"from": source.id})
    db.session.commit()
    return copy


def campaign_runs(campaign_id: int, limit: int = 20) -> list[SendRequest]:
    """The campaign's send requests (one per run), newest first."""
    return list(
        db.session.scalars(
            select(SendRequest)
            .where(SendRequest.campaign_id == campaign_id)
            .order_by(SendRequest.id.desc())
            .limit(limit)
        )
    )


def get_campaign(campaign_id: int) -> Campaign:
    """The campaign of the current organization.

    Raises:
        NotFound.
    """
    return _get(campaign_id)


def next_cron_runs(
    cron: str, timezone: str = "UTC", count: int = 5, after: datetime | None = None
) -> list[datetime]:
    """The next ``count`` times a cron expression fires, in ``timezone`` (aware datetimes).

    Raises:
        ValidationError: at ``cron`` or ``cron_timezone``.
    """
    if not cron or not croniter.is_valid(cron):
        raise ValidationError.single("cron", "Not a cron expression, e.g. '0 9 * * MON'.")
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError.single("cron_timezone", "Not an IANA time zone.") from None
    runs = croniter(cron, (after or datetime.now(UTC)).astimezone(zone))
    return [runs.get_next(datetime) for _ in range(count)]


def composer_choices() -> dict[str, Any]:
    """What a campaign can be composed of: published templates with their channels,
    segments and topics (for the console's composer)."""
    from whistle_web.channels.kinds import Channel

    known = [c.value for c in Channel]
    rows = db.session.execute(
        select(Template.key, Template.name, TemplateVersion.content)
        .join(TemplateVersion, TemplateVersion.id == Template.published_version_id)
        .order_by(Template.name, Template.key)
    ).all()
    return {
        "templates": [
            {"key": key, "name": name, "channels": [c for c in known if c in (content or {})]}
            for key, name, content in rows
        ],
        "segments": db.session.execute(
            select(Segment.id, Segment.name).order_by(Segment.name, Segment.id)
        ).all(),
        "topics": db.session.execute(
            select(Topic.key, Topic.name).order_by(Topic.name, Topic.key)
        ).all(),
    }
