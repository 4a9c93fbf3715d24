""" "Why not": did a recipient get a campaign, and if not, which rule kept them out.

:func:`explain` answers per channel twice: what the planner's rules decide for this one
recipient *now* (the planner's own rule functions, run on a one-recipient batch: nothing is
written), and, when the campaign has deliveries for the recipient, what actually happened
(the ledger). Audience membership is checked against the campaign's latest send request,
with its launch snapshot (``max_recipient_id``); a campaign that never launched is checked
against a send request as launching now would write it (never saved).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from whistle_web.audiences.models import Segment, Topic
from whistle_web.campaigns.models import AudienceType, Campaign
from whistle_web.campaigns.services import audience_spec
from whistle_web.channels.kinds import Channel
from whistle_web.channels.models import Provider
from whistle_web.deliveries.models import Delivery
from whistle_web.deliveries.planner import PLANNING_COLUMNS, Planner
from whistle_web.deliveries.status import DeliveryStatus, SuppressionCause
from whistle_web.deliveries.story import suppression_sentence
from whistle_web.errors import NotFound
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template
from whistle_web.notifications.models import SendRequest, SendRequestKind
from whistle_web.preferences.models import Category, Suppression, SuppressionReason
from whistle_web.recipients.models import Recipient
from whistle_web.recipients.services import get_recipient_by_id
from whistle_web.tenancy import require_organization_id

MAX_ID = 2**63 - 1
LABELS = {
    Channel.EMAIL: "Email",
    Channel.SMS: "SMS",
    Channel.PUSH: "Push",
    Channel.IN_APP: "In-app",
    Channel.WEBHOOK: "Webhook",
}
NOUNS = {Channel.EMAIL: "email", Channel.SMS: "SMS", Channel.PUSH: "push", Channel.IN_APP: "in-app"}


def when(moment: datetime | None) -> str:
    """``3 Nov 2026 14:05 UTC``."""
    if moment is None:
        return "an unknown time"
    moment = moment.astimezone(UTC)
    return f"{moment.day} {moment:%b %Y %H:%M} UTC"


@dataclass
class Verdict:
    channel: str
    label: str
    outcome: str  # "send", "delay", "suppressed", or a ledger status
    sentence: str
    reason: str | None = None  # the suppression cause, when there is one


@dataclass
class Explanation:
    campaign: Campaign
    launched: bool
    in_audience: bool
    audience: str  # one sentence about membership
    critical: str | None = None  # the critical category's note, if any
    now: list[Verdict] = field(default_factory=list)
    ledger: list[Verdict] = field(default_factory=list)
    problem: str | None = None  # why the rules could not be evaluated


def campaign_choices(limit: int = 500) -> list[Any]:
    """The organization's campaigns to choose from, newest first: (id, name, status)."""
    return list(
        db.session.execute(
            select(Campaign.id, Campaign.name, Campaign.status)
            .order_by(Campaign.id.desc())
            .limit(limit)
        )
    )


def _request(campaign: Campaign) -> tuple[SendRequest | None, bool]:
    """The campaign's latest send request, else one as launching now would write it."""
    latest = db.session.scalar(
        select(SendRequest)
        .where(SendRequest.campaign_id == campaign.id)
        .order_by(SendRequest.id.desc())
        .limit(1)
    )
    if latest is not None:
        return latest, True
    template = db.session.get(Template, campaign.template_id)
    version_id = template.published_version_id if template else None
    if version_id is None:
        return None, False
    return (
        SendRequest(
            organization_id=require_organization_id(),
            kind=SendRequestKind.CAMPAIGN,
            campaign_id=campaign.id,
            template_id=campaign.template_id,
            template_version_id=version_id,
            audience=audience_spec(campaign),
            data=campaign.data or {},
            channels=list(campaign.channels),
            send_at=datetime.now(UTC),
            local_send_time=campaign.local_send_time,
            cursor_recipient_id=0,
        ),
        False,
    )


def _audience_sentence(campaign: Campaign, recipient: Recipient, member: bool) -> str:
    kind = campaign.audience_type
    if kind == AudienceType.SEGMENT:
        segment = db.session.get(Segment, campaign.segment_id) if campaign.segment_id else None
        name = f"“{segment.name}”" if segment else "(deleted)"
        if member:
            return f"In the audience: matches segment {name}."
        return f"Not in the audience: does not match segment {name} (its rules, evaluated now)."
    if kind == AudienceType.TOPIC:
        topic = db.session.get(Topic, campaign.topic_id) if campaign.topic_id else None
        name = f"“{topic.name}”" if topic else "(deleted)"
        if member:
            return f"In the audience: subscribed to topic {name}."
        return f"Not in the audience: not subscribed to topic {name}."
    if kind == AudienceType.LIST:
        if member:
            return "In the audience: on the campaign's list of external ids."
        return (
            f"Not in the audience: external id “{recipient.external_id}” is not on the "
            "campaign's list."
        )
    return "In the audience: the campaign goes to every recipient."


def _rule_sentence(
    planner: Planner,
    cause: SuppressionCause,
    channel: Channel,
    recipient: Any,
    disabled: dict[Any, Any],
    sent_today: dict[tuple[int, str], int],
) -> str:
    if cause == SuppressionCause.UNSUBSCRIBED:
        return (
            "not sent — the recipient unsubscribed from everything on "
            f"{when(recipient.unsubscribed_at)}"
        )
    if cause == SuppressionCause.SUPPRESSION_LIST:
        address = getattr(recipient, "email" if channel == Channel.EMAIL else "phone") or ""
        row = db.session.scalar(
            select(Suppression)
            .where(Suppression.channel == channel, Suppression.address == address.lower())
            .order_by(Suppression.id.desc())
            .limit(1)
        )
        if row is None:
            return "not sent — the address is on the suppression list"
        what = {
            SuppressionReason.HARD_BOUNCE: "the address bounced",
            SuppressionReason.COMPLAINT: "the recipient reported a message as spam",
            SuppressionReason.MANUAL: "staff added the address",
        }.get(row.reason, "the address was listed")
        return f"not sent — {what} on {when(row.created_at)} and is on the suppression list"
    if cause == SuppressionCause.PREFERENCE:
        prefs = disabled.get(recipient.id, {})
        key = planner._deciding_preference(prefs, channel)
        category_id, pref_channel = key if key else (None, None)
        category = db.session.get(Category, category_id) if category_id else None
        cat = category.name if category else None
        noun = LABELS.get(Channel(pref_channel), pref_channel) if pref_channel else None
        if cat and noun:
            return f"not sent — the recipient turned off {cat} by {noun}"
        if cat:
            return f"not sent — the recipient turned off {cat} on every channel"
        if noun:
            return f"not sent — the recipient turned off {noun} for every category"
        return "not sent — the recipient turned off every notification"
    if cause == SuppressionCause.NO_ADDRESS:
        if channel == Channel.EMAIL:
            return "not sent — the recipient has no email address"
        if channel == Channel.SMS:
            return "not sent — the recipient has no phone number"
        if channel == Channel.PUSH:
            return "not sent — no active device (that an enabled push provider can reach)"
        return "not sent — no address for this channel"
    if cause == SuppressionCause.FREQUENCY_CAP:
        n = sent_today.get((recipient.id, channel.value), 0)
        noun = NOUNS.get(channel, channel.value)
        return (
            f"not sent — the frequency cap is reached: {n} {noun} message{'s' * (n != 1)} "
            f"in the last 24 hours (at most {planner.frequency_cap} a day)"
        )
    return f"not sent — {suppression_sentence(cause)}"


def _evaluate(planner: Planner, recipient_id: int) -> list[Verdict]:
    """The planner's rules for one recipient now, in the planner's order; nothing is written."""
    rows = db.session.execute(select(*PLANNING_COLUMNS).where(Recipient.id == recipient_id)).all()
    ids = [recipient_id]
    disabled = planner._disabled_preferences(ids)
    suppressed = planner._suppressed_addresses(rows)
    with_device = planner._recipients_with_devices(ids)
    sent_today = planner._sent_today(ids)
    if sent_today and planner.request.campaign_id is not None:
        # The campaign's own earlier deliveries do not count against it: "now" means
        # "were this campaign planned now".
        own = db.session.execute(
            select(Delivery.channel, func.count())
            .where(
                Delivery.recipient_id == recipient_id,
                Delivery.campaign_id == planner.request.campaign_id,
                Delivery.created_at > planner.now - timedelta(days=1),
                Delivery.status.not_in([DeliveryStatus.SUPPRESSED, DeliveryStatus.CANCELLED]),
            )
            .group_by(Delivery.channel)
        ).all()
        for channel, n in own:
            key = (recipient_id, channel.value)
            if key in sent_today:
                sent_today[key] -= n
    row = rows[0]
    verdicts = []
    for channel in planner.channels:
        label = LABELS.get(channel, channel.value)
        cause = planner._suppression(row, channel, disabled, suppressed, with_device, sent_today)
        if cause is not None:
            sentence = _rule_sentence(planner, cause, channel, row, disabled, sent_today)
            verdicts.append(Verdict(channel.value, label, "suppressed", sentence, cause.value))
            continue
        later = planner._not_before(row)
        if later is not None:
            verdicts.append(
                Verdict(
                    channel.value,
                    label,
                    "delay",
                    f"would be sent, held until {when(later)} (quiet hours or local send time)",
                )
            )
        else:
            verdicts.append(Verdict(channel.value, label, "send", "would be sent"))
    return verdicts


def _ledger_sentence(d: Delivery, provider: str | None) -> str:
    status = d.status
    via = f" via {provider}" if provider else ""
    if status == DeliveryStatus.SUPPRESSED:
        return f"not sent — {suppression_sentence(d.suppression_reason)} (when it was planned)"
    if status == DeliveryStatus.CANCELLED:
        return "not sent — cancelled before it went out"
    if status == DeliveryStatus.QUEUED:
        if d.not_before is not None:
            return f"queued, held until {when(d.not_before)}"
        return "queued, not sent yet"
    if status == DeliveryStatus.SENDING:
        return f"being sent{via}"
    if status == DeliveryStatus.FAILED:
        tries = f" after {d.attempts} attempt{'s' * (d.attempts != 1)}"
        return f"failed on {when(d.failed_at)}{tries}{via}: {d.error or 'no error recorded'}"
    if status == DeliveryStatus.BOUNCED:
        return f"sent on {when(d.sent_at)}{via}, then bounced on {when(d.bounced_at)}"
    parts = [f"was sent on {when(d.sent_at)}{via}"]
    for name, stamp in (
        ("delivered", d.delivered_at),
        ("seen", d.seen_at),
        ("read", d.read_at),
        ("clicked", d.clicked_at),
    ):
        if stamp is not None:
            parts.append(f"{name} {when(stamp)}")
    return ", ".join(parts)


def _ledger(recipient_id: int, campaign_id: int) -> list[Verdict]:
    """What happened to the campaign's deliveries to this recipient (latest run per channel)."""
    deliveries = list(
        db.session.scalars(
            select(Delivery)
            .where(Delivery.recipient_id == recipient_id, Delivery.campaign_id == campaign_id)
            .order_by(Delivery.id.desc())
        )
    )
    latest: dict[str, Delivery] = {}
    for d in deliveries:
        latest.setdefault(d.channel.value, d)
    provider_ids = {d.provider_id for d in latest.values() if d.provider_id}
    names = {
        p.id: p.name
        for p in db.session.scalars(select(Provider).where(Provider.id.in_(provider_ids)))
    }
    return [
        Verdict(
            channel,
            LABELS.get(Channel(channel), channel),
            d.status.value,
            _ledger_sentence(d, names.get(d.provider_id) if d.provider_id else None),
            d.suppression_reason.value if d.suppression_reason else None,
        )
        for channel, d in sorted(latest.items())
    ]


def explain(recipient_id: int, campaign_id: int) -> Explanation:
    """Was the recipient in the campaign's audience, and per channel what keeps them out.

    Raises:
        NotFound: no such recipient or campaign in the current organization.
    """
    recipient = get_recipient_by_id(recipient_id)
    campaign = None
    if 0 < campaign_id <= MAX_ID:
        campaign = db.session.scalar(select(Campaign).where(Campaign.id == campaign_id))
    if campaign is None:
        raise NotFound(f"No campaign {campaign_id}.")
    ledger = _ledger(recipient.id, campaign.id)
    request, launched = _request(campaign)
    if request is None:
        return Explanation(
            campaign,
            False,
            False,
            "The campaign has not launched and its template is not published.",
            ledger=ledger,
            problem="Publish the template to evaluate the rules.",
        )
    try:
        planner = Planner(request)
    except LookupError as error:  # the segment was deleted
        return Explanation(campaign, launched, False, str(error), ledger=ledger, problem=str(error))
    member = (
        db.session.scalar(
            select(Recipient.id).where(Recipient.id == recipient.id, planner.condition)
        )
        is not None
    )
    audience = _audience_sentence(campaign, recipient, member)
    after_snapshot = (
        launched
        and request.max_recipient_id is not None
        and recipient.id > request.max_recipient_id
    )
    if after_snapshot:
        audience = (
            f"Not in the audience: the recipient was created after the launch "
            f"({when(request.created_at)}), and the audience is fixed at launch."
        )
        member = False
    result = Explanation(campaign, launched, member, audience, ledger=ledger)
    if planner.critical and planner.category is not None:
        result.critical = (
            f"“{planner.category.name}” is a critical category: unsubscribes, preferences and "
            "the frequency cap do not apply."
        )
    if member or ledger:
        result.now = _evaluate(planner, recipient.id)
    return result
