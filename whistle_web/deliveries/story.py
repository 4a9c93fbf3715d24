"""The recipient's story: every notification a recipient was sent, with each delivery's path.

Read-only queries for the console's History tab, inside the current organization's scope.
A page is a run of notifications, newest first, keyed on the notification id (``before``),
never OFFSET. Each delivery's steps merge the ledger's timestamps with its append-only
events, ordered by time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from whistle_web.campaigns.models import Campaign
from whistle_web.channels.models import Provider
from whistle_web.deliveries.models import Delivery, DeliveryEvent
from whistle_web.deliveries.status import SuppressionCause
from whistle_web.extensions import db
from whistle_web.message_templates.models import Template
from whistle_web.notifications.models import Notification, SendRequest

PAGE_SIZE = 20
MAX_ID = 2**63 - 1
# The ledger's timestamps, as steps of the path (the delivery's created_at is "planned").
STAMPS = (
    ("sent", "sent_at"),
    ("delivered", "delivered_at"),
    ("seen", "seen_at"),
    ("read", "read_at"),
    ("clicked", "clicked_at"),
    ("archived", "archived_at"),
    ("failed", "failed_at"),
    ("bounced", "bounced_at"),
)
# One sentence per suppression cause, as the ledger recorded it.
SUPPRESSED_BECAUSE = {
    SuppressionCause.UNSUBSCRIBED: "the recipient had unsubscribed from everything",
    SuppressionCause.SUPPRESSION_LIST: "the address is on the suppression list",
    SuppressionCause.PREFERENCE: "the recipient's preferences turned this off",
    SuppressionCause.NO_ADDRESS: "there was no address or active device for this channel",
    SuppressionCause.FREQUENCY_CAP: "the daily frequency cap was reached",
    SuppressionCause.DUPLICATE: "an identical message had just been sent",
}


def suppression_sentence(reason: SuppressionCause | str | None) -> str:
    if reason is None:
        return "not sent"
    try:
        return SUPPRESSED_BECAUSE[SuppressionCause(reason)]
    except ValueError:
        return str(reason)


@dataclass
class Step:
    name: str
    at: datetime
    detail: str = ""


@dataclass
class DeliveryPath:
    delivery: Delivery
    provider_name: str | None
    steps: list[Step] = field(default_factory=list)

    @property
    def suppressed_because(self) -> str | None:
        if self.delivery.suppression_reason is None:
            return None
        return suppression_sentence(self.delivery.suppression_reason)


@dataclass
class StoryEntry:
    notification: Notification
    kind: str
    template: Template | None
    campaign: Campaign | None
    deliveries: list[DeliveryPath]


def _detail(data: dict[str, Any] | None) -> str:
    if not data:
        return ""
    for key in ("error", "reason", "url", "message"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value[:500]
    return ""


FINAL = ("failed", "bounced")


def _failure_detail(delivery: Delivery) -> str:
    """The error as recorded, and its reason (the funnel's failed:/bounced:<reason>)."""
    reason = delivery.failure_reason
    parts = [delivery.error or "", f"({str(reason).replace('_', ' ')})" if reason else ""]
    return " ".join(p for p in parts if p)


def delivery_steps(delivery: Delivery, events: list[DeliveryEvent]) -> list[Step]:
    """Planned, then every status with its time: the ledger's stamps and the events merged.

    An event of the same type at the same moment as a stamp is one step, not two.
    """
    steps = [Step("planned", delivery.created_at)]
    if delivery.suppression_reason is not None:
        steps.append(
            Step(
                "suppressed", delivery.created_at, suppression_sentence(delivery.suppression_reason)
            )
        )
    seen: set[tuple[str, datetime]] = set()
    for name, column in STAMPS:
        at = getattr(delivery, column)
        if at is not None:
            steps.append(Step(name, at, _failure_detail(delivery) if name in FINAL else ""))
            seen.add((name, at))
    for event in events:
        if (event.type, event.occurred_at) in seen:
            continue
        seen.add((event.type, event.occurred_at))
        steps.append(Step(event.type, event.occurred_at, _detail(event.data)))
    steps.sort(key=lambda s: s.at)
    return steps


def recipient_story(
    recipient_id: int, *, before: int | None = None, limit: int = PAGE_SIZE
) -> tuple[list[StoryEntry], int | None]:
    """One page of the recipient's notifications, newest first, with their deliveries.

    Returns:
        The page, and the cursor (``before``) of the next page, or None on the last one.
    """
    stmt = select(Notification).where(Notification.recipient_id == recipient_id)
    if before is not None:
        stmt = stmt.where(Notification.id < min(before, MAX_ID))
    notifications = list(db.session.scalars(stmt.order_by(Notification.id.desc()).limit(limit + 1)))
    next_cursor = None
    if len(notifications) > limit:
        notifications = notifications[:limit]
        next_cursor = notifications[-1].id
    if not notifications:
        return [], None
    ids = [n.id for n in notifications]
    requests = {
        r.id: r
        for r in db.session.scalars(
            select(SendRequest).where(
                SendRequest.id.in_({n.send_request_id for n in notifications})
            )
        )
    }
    template_ids = {n.template_id for n in notifications if n.template_id is not None}
    templates = {
        t.id: t for t in db.session.scalars(select(Template).where(Template.id.in_(template_ids)))
    }
    campaign_ids = {n.campaign_id for n in notifications if n.campaign_id is not None}
    campaigns = {
        c.id: c for c in db.session.scalars(select(Campaign).where(Campaign.id.in_(campaign_ids)))
    }
    deliveries = list(
        db.session.scalars(
            select(Delivery)
            .where(Delivery.notification_id.in_(ids), Delivery.recipient_id == recipient_id)
            .order_by(Delivery.id)
        )
    )
    events: dict[int, list[DeliveryEvent]] = defaultdict(list)
    if deliveries:
        for event in db.session.scalars(
            select(DeliveryEvent)
            .where(DeliveryEvent.delivery_id.in_([d.id for d in deliveries]))
            .order_by(DeliveryEvent.occurred_at, DeliveryEvent.id)
        ):
            events[event.delivery_id].append(event)
    provider_ids = {d.provider_id for d in deliveries if d.provider_id is not None}
    providers = {
        p.id: p.name
        for p in db.session.scalars(select(Provider).where(Provider.id.in_(provider_ids)))
    }
    by_notification: dict[int, list[DeliveryPath]] = defaultdict(list)
    for d in deliveries:
        path = DeliveryPath(d, providers.get(d.provider_id) if d.provider_id else None)
        path.steps = delivery_steps(d, events.get(d.id, []))
        by_notification[d.notification_id].append(path)
    entries = []
    for n in notifications:
        request = requests.get(n.send_request_id)
        entries.append(
            StoryEntry(
                notification=n,
                kind=str(request.kind) if request else "",
                template=templates.get(n.template_id) if n.template_id else None,
                campaign=campaigns.get(n.campaign_id) if n.campaign_id else None,
                deliveries=by_notification.get(n.id, []),
            )
        )
    return entries, next_cursor


def get_delivery(recipient_id: int, delivery_id: int) -> Delivery | None:
    """The recipient's delivery in the current organization, or None."""
    if not 0 < delivery_id <= MAX_ID:
        return None
    return db.session.scalar(
        select(Delivery).where(Delivery.id == delivery_id, Delivery.recipient_id == recipient_id)
    )
