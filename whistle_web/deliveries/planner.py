"""The planner: turn a send request into notifications and deliveries, batch by batch.

The audience is walked in batches keyed on recipient id (``id > cursor``, never OFFSET),
bounded by the id snapshot taken at launch so recipients created later are left out.
For each recipient and channel the rules apply in this order, each recorded as a
``suppressed`` delivery with its reason: global unsubscribe, suppression list, category
and channel preferences (critical categories bypass unsubscribe and preferences), missing
address or device, frequency cap. Quiet hours and local-time sends delay, never drop.

One batch is written in one transaction together with the new cursor, so a planner that
dies mid-way resumes exactly where the last committed batch ended.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, select, true
from sqlalchemy.dialects.postgresql import insert

from whistle_web.audiences.models import Segment, Subscription
from whistle_web.audiences.segments import compile_rules
from whistle_web.campaigns.models import Campaign, CampaignStatus
from whistle_web.channels.kinds import Channel
from whistle_web.deliveries.ledger import CounterRow, bump_counters
from whistle_web.deliveries.models import Delivery, DeliveryBatch
from whistle_web.deliveries.status import DeliveryStatus, SuppressionCause
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template, TemplateVersion
from whistle_web.notifications.models import Notification, SendRequest, SendRequestStatus
from whistle_web.organizations.models import Organization
from whistle_web.preferences.models import Category, Preference, Suppression
from whistle_web.recipients.models import Device, Recipient

BATCH_SIZE = 1000
ADDRESSED = {Channel.EMAIL: "email", Channel.SMS: "phone"}
PrefKey = tuple[int | None, str | None]  # (category id or None, channel or None)


@dataclass(frozen=True)
class PlannedBatch:
    batch_ids: list[int]
    recipients: int


def audience_condition(request: SendRequest) -> Any:
    """The WHERE condition selecting the request's recipients."""
    audience = request.audience
    kind = audience.get("type")
    if kind == "recipients":
        return Recipient.id.in_(audience["ids"])
    if kind == "topic":
        return Recipient.id.in_(
            select(Subscription.recipient_id).where(Subscription.topic_id == audience["id"])
        )
    if kind == "segment":
        segment = db.session.get(Segment, audience["id"])
        if segment is None:
            raise LookupError(f"segment {audience['id']} no longer exists")
        return compile_rules(segment.rules)
    if kind == "list":
        return Recipient.external_id.in_(audience["external_ids"])
    if kind == "all":
        return true()
    raise ValueError(f"unknown audience type {kind!r}")


def resolve_channels(
    request: SendRequest, version: TemplateVersion, category: Category | None
) -> list[Channel]:
    """The request's channels, else the template's narrowed to the category's defaults."""
    if request.channels:
        return [Channel(c) for c in request.channels]
    available = [Channel(c) for c in version.content if c in Channel.__members__.values()]
    if category is not None and category.default_channels:
        narrowed = [c for c in available if c in category.default_channels]
        return narrowed or available
    return available


def next_batch_ids(request: SendRequest, condition: Any, limit: int = BATCH_SIZE) -> list[int]:
    stmt = select(Recipient.id).where(Recipient.id > request.cursor_recipient_id, condition)
    if request.max_recipient_id is not None:
        stmt = stmt.where(Recipient.id <= request.max_recipient_id)
    return list(db.session.scalars(stmt.order_by(Recipient.id).limit(limit)))


class Planner:
    """Plans one send request inside its organization's scope."""

    def __init__(self, request: SendRequest, now: datetime | None = None) -> None:
        self.request = request
        self.now = now or datetime.now(UTC)
        self.template = db.session.get(Template, request.template_id)
        self.version = db.session.get(TemplateVersion, request.template_version_id)
        self.category = (
            db.session.get(Category, self.template.category_id)
            if self.template and self.template.category_id
            else None
        )
        self.critical = bool(self.category and self.category.critical)
        self.channels = resolve_channels(request, self.version, self.category)
        organization = db.session.get(Organization, request.organization_id)
        cap = (organization.settings or {}).get("frequency_cap_per_day")
        self.frequency_cap = int(cap) if isinstance(cap, int) and cap > 0 else None
        self.condition = audience_condition(request)

    def plan_batch(self, recipient_ids: list[int]) -> PlannedBatch:
        """Write notifications, deliveries and channel batches for these recipients."""
        recipients = db.session.execute(
            select(
                Recipient.id,
                Recipient.email,
                Recipient.phone,
                Recipient.timezone,
                Recipient.unsubscribed_at,
                Recipient.quiet_hours_start,
                Recipient.quiet_hours_end,
            ).where(Recipient.id.in_(recipient_ids))
        ).all()
        disabled = self._disabled_preferences(recipient_ids)
        suppressed = self._suppressed_addresses(recipients)
        with_device = self._recipients_with_devices(recipient_ids)
        sent_today = self._sent_today(recipient_ids)

        notification_ids = self._insert_notifications([r.id for r in recipients])
        batches: dict[Channel, DeliveryBatch] = {}
        rows: list[dict[str, Any]] = []
        counters: list[CounterRow] = []
        campaign_id, template_id = self.request.campaign_id, self.request.template_id
        for recipient in recipients:
            notification_id = notification_ids.get(recipient.id)
            if notification_id is None:
                continue  # planned by an earlier run of this batch
            for channel in self.channels:
                reason = self._suppression(
                    recipient, channel, disabled, suppressed, with_device, sent_today
                )
                counters.append(CounterRow(campaign_id, template_id, channel, "targeted", self.now))
                row = {
                    "organization_id": self.request.organization_id,
                    "notification_id": notification_id,
                    "recipient_id": recipient.id,
                    "campaign_id": campaign_id,
                    "template_id": template_id,
                    "channel": channel,
                    "address": getattr(recipient, ADDRESSED[channel])
                    if channel in ADDRESSED
                    else None,
                }
                if reason is not None:
                    row.update(status=DeliveryStatus.SUPPRESSED, suppression_reason=reason)
                    counters += [
                        CounterRow(campaign_id, template_id, channel, "suppressed", self.now),
                        CounterRow(
                            campaign_id, template_id, channel, f"suppressed:{reason}", self.now
                        ),
                    ]
                else:
                    row["status"] = DeliveryStatus.QUEUED
                    counters.append(
                        CounterRow(campaign_id, template_id, channel, "queued", self.now)
                    )
                    not_before = self._not_before(recipient)
                    row["not_before"] = not_before
                    if not_before is None:
                        if channel not in batches:
                            batches[channel] = DeliveryBatch(
                                send_request_id=self.request.id, channel=channel
                            )
                            db.session.add(batches[channel])
                        row["batch"] = batches[channel]
                rows.append(row)
        db.session.flush()  # batch ids
        for row in rows:
            batch = row.pop("batch", None)
            row["batch_id"] = batch.id if batch is not None else None
            row.setdefault("not_before", None)
            row.setdefault("suppression_reason", None)
        for batch in batches.values():
            batch.size = sum(1 for r in rows if r["batch_id"] == batch.id)
        if rows:
            db.session.execute(insert(Delivery), rows)
        bump_counters(counters)
        return PlannedBatch([b.id for b in batches.values()], len(recipients))

    # --- rules ------------------------------------------------------------------------
    def _suppression(
        self,
        recipient: Any,
        channel: Channel,
        disabled: dict[int, dict[PrefKey, bool]],
        suppressed: set[tuple[str, str]],
        with_device: set[int],
        sent_today: dict[tuple[int, str], int],
    ) -> SuppressionCause | None:
        if not self.critical and recipient.unsubscribed_at is not None:
            return SuppressionCause.UNSUBSCRIBED
        address = getattr(recipient, ADDRESSED[channel]) if channel in ADDRESSED else None
        if address and (channel.value, address.lower()) in suppressed:
            return SuppressionCause.SUPPRESSION_LIST
        if not self.critical and not self._allowed(disabled.get(recipient.id, {}), channel):
            return SuppressionCause.PREFERENCE
        if channel in ADDRESSED and not address:
            return SuppressionCause.NO_ADDRESS
        if channel == Channel.PUSH and recipient.id not in with_device:
            return SuppressionCause.NO_ADDRESS
        if (
            self.frequency_cap is not None
            and not self.critical
            and sent_today.get((recipient.id, channel.value), 0) >= self.frequency_cap
        ):
            return SuppressionCause.FREQUENCY_CAP
        return None

    def _allowed(self, prefs: dict[PrefKey, bool], channel: Channel) -> bool:
        """The most specific preference wins; with none, the channel is on."""
        category_id = self.category.id if self.category else None
        keys: list[PrefKey] = []
        if category_id is not None:
            keys += [(category_id, channel.value), (category_id, None)]
        keys += [(None, channel.value), (None, None)]
        for key in keys:
            if key in prefs:
                return prefs[key]
        return True

    def _not_before(self, recipient: Any) -> datetime | None:
        """When a delivery may go: local send time, then quiet hours (never for critical)."""
        zone = _zone(recipient.timezone)
        at: datetime | None = None
        if self.request.local_send_time is not None:
            at = next_local_time(
                max(self.now, self.request.send_at), self.request.local_send_time, zone
            )
        if not self.critical and recipient.quiet_hours_start and recipient.quiet_hours_end:
            end = quiet_hours_end(
                at or self.now, recipient.quiet_hours_start, recipient.quiet_hours_end, zone
            )
            if end is not None:
                at = end
        return at if at is not None and at > self.now else None

    # --- look-ups for a whole batch ----------------------------------------------------
    def _disabled_preferences(self, ids: list[int]) -> dict[int, dict[PrefKey, bool]]:
        category_id = self.category.id if self.category else None
        rows = db.session.execute(
            select(
                Preference.recipient_id,
                Preference.category_id,
                Preference.channel,
                Preference.enabled,
            )
            .where(Preference.recipient_id.in_(ids))
            .where((Preference.category_id.is_(None)) | (Preference.category_id == category_id))
        ).all()
        prefs: dict[int, dict[PrefKey, bool]] = defaultdict(dict)
        for recipient_id, cat, channel, enabled in rows:
            prefs[recipient_id][(cat, channel.value if channel else None)] = enabled
        return prefs

    def _suppressed_addresses(self, recipients: list[Any]) -> set[tuple[str, str]]:
        addresses = {
            getattr(r, ADDRESSED[c]).lower()
            for r in recipients
            for c in self.channels
            if c in ADDRESSED and getattr(r, ADDRESSED[c])
        }
        if not addresses:
            return set()
        rows = db.session.execute(
            select(Suppression.channel, Suppression.address).where(
                Suppression.address.in_(addresses)
            )
        ).all()
        return {(channel.value, address) for channel, address in rows}

    def _recipients_with_devices(self, ids: list[int]) -> set[int]:
        if Channel.PUSH not in self.channels:
            return set()
        return set(
            db.session.scalars(
                select(Device.recipient_id)
                .where(Device.recipient_id.in_(ids), Device.disabled_at.is_(None))
                .distinct()
            )
        )

    def _sent_today(self, ids: list[int]) -> dict[tuple[int, str], int]:
        if self.frequency_cap is None or self.critical:
            return {}
        rows = db.session.execute(
            select(Delivery.recipient_id, Delivery.channel, func.count())
            .where(
                Delivery.recipient_id.in_(ids),
                Delivery.created_at > self.now - timedelta(days=1),
                Delivery.status.not_in([DeliveryStatus.SUPPRESSED, DeliveryStatus.CANCELLED]),
            )
            .group_by(Delivery.recipient_id, Delivery.channel)
        ).all()
        return {(rid, channel.value): n for rid, channel, n in rows}

    def _insert_notifications(self, recipient_ids: list[int]) -> dict[int, int]:
        if not recipient_ids:
            return {}
        category_id = self.category.id if self.category else None
        stmt = (
            insert(Notification)
            .values(
                [
                    {
                        "organization_id": self.request.organization_id,
                        "send_request_id": self.request.id,
                        "campaign_id": self.request.campaign_id,
                        "template_id": self.request.template_id,
                        "category_id": category_id,
                        "recipient_id": rid,
                        "data": self.request.data,
                    }
                    for rid in recipient_ids
                ]
            )
            .on_conflict_do_nothing(index_elements=["send_request_id", "recipient_id"])
            .returning(Notification.recipient_id, Notification.id)
        )
        return dict(db.session.execute(stmt).all())


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def next_local_time(after: datetime, at: time, zone: ZoneInfo) -> datetime:
    """The first moment at or after ``after`` when the clock in ``zone`` shows ``at``."""
    local = after.astimezone(zone)
    candidate = datetime.combine(local.date(), at, tzinfo=zone)
    if candidate < local:
        candidate = datetime.combine(local.date() + timedelta(days=1), at, tzinfo=zone)
    return candidate.astimezone(UTC)


def quiet_hours_end(moment: datetime, start: time, end: time, zone: ZoneInfo) -> datetime | None:
    """If ``moment`` falls in the quiet window (which may span midnight), when it ends."""
    local = moment.astimezone(zone)
    clock = local.time().replace(tzinfo=None)
    if start <= end:
        inside = start <= clock < end
        end_day = local.date()
    else:  # e.g. 22:00 -> 07:00
        inside = clock >= start or clock < end
        end_day = local.date() + timedelta(days=1) if clock >= start else local.date()
    if not inside:
        return None
    return datetime.combine(end_day, end, tzinfo=zone).astimezone(UTC)


def plan(
    send_request_id: int, *, batch_size: int | None = None, max_batches: int | None = None
) -> list[int]:
    """Plan a send request from its cursor to the end (or a pause). Commits per batch.

    Returns:
        Ids of the channel batches created, to be enqueued by the caller.
    """
    request = db.session.get(SendRequest, send_request_id)
    if request is None or request.status in (
        SendRequestStatus.CANCELLED,
        SendRequestStatus.FAILED,
        SendRequestStatus.PLANNED,
    ):
        return []
    if request.send_at > datetime.now(UTC):
        return []
    planner = Planner(request)
    request.status = SendRequestStatus.PLANNING
    created: list[int] = []
    done = 0
    while max_batches is None or done < max_batches:
        if _campaign_halted(request):
            db.session.commit()
            return created
        ids = next_batch_ids(request, planner.condition, batch_size or BATCH_SIZE)
        if not ids:
            request.status = SendRequestStatus.PLANNED
            request.planned_at = datetime.now(UTC)
            db.session.commit()
            return created
        result = planner.plan_batch(ids)
        request.cursor_recipient_id = ids[-1]
        request.planned_count += result.recipients
        request.heartbeat_at = datetime.now(UTC)
        db.session.commit()
        created += result.batch_ids
        if result.batch_ids:
            from workers.sending import enqueue_batches

            enqueue_batches(result.batch_ids, campaign=request.campaign_id is not None)
        done += 1
    return created


def _campaign_halted(request: SendRequest) -> bool:
    if request.campaign_id is None:
        db.session.refresh(request, ["status"])
        return request.status == SendRequestStatus.CANCELLED
    status = db.session.scalar(select(Campaign.status).where(Campaign.id == request.campaign_id))
    return status in (CampaignStatus.PAUSED, CampaignStatus.CANCELLED)
