"""Moving deliveries through the ledger, appending events, and keeping funnel counters.

Every status change goes through here so that the counters in ``delivery_stats`` stay equal
to what :func:`whistle_web.deliveries.services.rebuild_stats` derives from the ledger: a
metric counts a delivery once, when its timestamp is first set.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert

from whistle_web.channels.kinds import Channel
from whistle_web.deliveries.failures import bounce_reason
from whistle_web.deliveries.models import (
    Delivery,
    DeliveryEvent,
    DeliveryLinkStat,
    StatScope,
)
from whistle_web.deliveries.status import PROGRESS, DeliveryStatus, can_transition
from whistle_web.extensions import db
from whistle_web.inbox.outbox import note_state_change
from whistle_web.preferences.models import Suppression, SuppressionReason
from whistle_web.tenancy import require_organization_id

# Progress steps after the provider accepted the message, each with its timestamp column.
STAMPED_STEPS: tuple[tuple[DeliveryStatus, str], ...] = (
    (DeliveryStatus.SENT, "sent_at"),
    (DeliveryStatus.DELIVERED, "delivered_at"),
    (DeliveryStatus.SEEN, "seen_at"),
    (DeliveryStatus.READ, "read_at"),
    (DeliveryStatus.CLICKED, "clicked_at"),
)
FINAL_STAMPS = {DeliveryStatus.FAILED: "failed_at", DeliveryStatus.BOUNCED: "bounced_at"}
# Events that move the ledger; anything else is recorded without changing the status.
LEDGER_EVENTS = {
    "delivered": DeliveryStatus.DELIVERED,
    "seen": DeliveryStatus.SEEN,
    "opened": DeliveryStatus.SEEN,
    "read": DeliveryStatus.READ,
    "clicked": DeliveryStatus.CLICKED,
    "bounced": DeliveryStatus.BOUNCED,
}


@dataclass(frozen=True)
class CounterRow:
    """``count`` deliveries of (campaign, template, channel) reached ``metric`` at ``at``.

    Bulk writers pass one row per group with its count (from a ``GROUP BY`` over the rows
    their statement changed) rather than one row per delivery.
    """

    campaign_id: int | None
    template_id: int | None
    channel: Channel | str
    metric: str
    at: datetime
    count: int = 1


def bump_counters(rows: Iterable[CounterRow]) -> None:
    """Add increments to the organization, campaign and template funnels in one statement."""
    org_id = require_organization_id()
    totals: Counter[tuple[StatScope, int, str, str, datetime]] = Counter()
    for row in rows:
        if row.count <= 0:
            continue
        bucket = row.at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        channel = Channel(row.channel).value
        totals[(StatScope.ORGANIZATION, org_id, channel, row.metric, bucket)] += row.count
        if row.campaign_id is not None:
            totals[(StatScope.CAMPAIGN, row.campaign_id, channel, row.metric, bucket)] += row.count
        if row.template_id is not None:
            totals[(StatScope.TEMPLATE, row.template_id, channel, row.metric, bucket)] += row.count
    if not totals:
        return
    # Sorted so concurrent writers lock counter rows in the same order (no deadlocks).
    keys = sorted(totals)
    db.session.execute(
        _BUMP,
        {
            "org": org_id,
            "scopes": [k[0].value for k in keys],
            "scope_ids": [k[1] for k in keys],
            "channels": [k[2] for k in keys],
            "metrics": [k[3] for k in keys],
            "buckets": [k[4] for k in keys],
            "values": [totals[k] for k in keys],
        },
    )


# One statement whatever the number of counters: its plan is prepared once (a multi-row
# VALUES list was a new statement to compile for every count of rows).
_BUMP = text(
    """
INSERT INTO delivery_stats AS s (organization_id, scope, scope_id, channel, metric, bucket, value)
SELECT :org, v.scope, v.scope_id, v.channel, v.metric, v.bucket, v.value
FROM unnest(CAST(:scopes AS text[]), CAST(:scope_ids AS bigint[]), CAST(:channels AS text[]),
            CAST(:metrics AS text[]), CAST(:buckets AS timestamptz[]), CAST(:values AS bigint[]))
     WITH ORDINALITY AS v(scope, scope_id, channel, metric, bucket, value, ord)
ORDER BY v.ord
ON CONFLICT ON CONSTRAINT uq_delivery_stats_key DO UPDATE SET value = s.value + EXCLUDED.value
"""
)


def url_hash(url: str) -> str:
    """The key of a link in ``delivery_link_stats``: PostgreSQL's ``md5(url)``."""
    return hashlib.md5(url.encode(), usedforsecurity=False).hexdigest()


def bump_link_clicks(delivery: Delivery, url: str, count: int = 1) -> None:
    """Count clicks on ``url`` for the delivery's campaign and template (every click, as
    the events record them; the funnel's "clicked" step counts deliveries)."""
    scopes = [
        (scope, scope_id)
        for scope, scope_id in (
            (StatScope.CAMPAIGN, delivery.campaign_id),
            (StatScope.TEMPLATE, delivery.template_id),
        )
        if scope_id is not None
    ]
    if not scopes:
        return
    stmt = insert(DeliveryLinkStat).values(
        [
            {
                "organization_id": require_organization_id(),
                "scope": scope,
                "scope_id": scope_id,
                "channel": Channel(delivery.channel),
                "url_hash": url_hash(url),
                "url": url,
                "clicks": count,
            }
            for scope, scope_id in scopes  # campaign before template: one lock order
        ]
    )
    stmt = stmt.on_conflict_do_update(
        constraint="uq_delivery_link_stats_key",
        set_={"clicks": DeliveryLinkStat.clicks + stmt.excluded.clicks},
    )
    db.session.execute(stmt)


def newly_reached(delivery: Delivery, status: DeliveryStatus) -> list[tuple[DeliveryStatus, str]]:
    """Timestamped steps up to ``status`` that this delivery has not reached yet.

    A later step implies the earlier ones (a click means the email arrived and was opened),
    so they are stamped together and the funnel never shows more clicks than opens.
    """
    if status in FINAL_STAMPS:
        return [(status, FINAL_STAMPS[status])]
    target = PROGRESS.index(status)
    return [
        (step, column)
        for step, column in STAMPED_STEPS
        if PROGRESS.index(step) <= target and getattr(delivery, column) is None
    ]


def record_event(
    delivery_id: int,
    event_type: str,
    *,
    at: datetime | None = None,
    data: dict[str, Any] | None = None,
) -> Delivery | None:
    """Apply one event (provider callback, pixel, click, widget or API action) to a delivery.

    The ledger only moves forward: a late or repeated event is appended to the history but
    changes nothing else. Complaints and hard bounces put the address on the suppression
    list. Commits nothing; the caller commits.

    Returns:
        The delivery, or None when it does not exist in the current organization.
    """
    at = at or datetime.now(UTC)
    data = data or {}
    delivery = db.session.scalar(
        select(Delivery).where(Delivery.id == delivery_id).with_for_update()
    )
    if delivery is None:
        return None
    db.session.add(
        DeliveryEvent(delivery_id=delivery.id, type=event_type, occurred_at=at, data=data)
    )
    counters: list[CounterRow] = []
    inbox_state = _inbox_state(delivery)

    target = LEDGER_EVENTS.get(event_type)
    if target is not None and delivery.status != target and can_transition(delivery.status, target):
        for step, column in newly_reached(delivery, target):
            setattr(delivery, column, at)
            counters.append(_counter(delivery, step.value, at))
            if step in FINAL_STAMPS:
                # Only a "bounced" event ends a delivery here (failures are the workers').
                delivery.failure_reason = bounce_reason(data)
                counters.append(_counter(delivery, f"{step.value}:{delivery.failure_reason}", at))
        delivery.status = target
    elif event_type == "archived" and delivery.archived_at is None:
        delivery.archived_at = at
        counters.append(_counter(delivery, "archived", at))
    elif target is None and event_type != "archived":
        counters.append(_counter(delivery, f"event:{event_type}", at))

    if event_type == "complaint" or (
        event_type == "bounced" and data.get("bounce_type", "permanent") == "permanent"
    ):
        suppress_address(
            delivery.channel,
            delivery.address,
            SuppressionReason.COMPLAINT
            if event_type == "complaint"
            else SuppressionReason.HARD_BOUNCE,
            delivery_id=delivery.id,
        )
    bump_counters(counters)
    url = data.get("url")
    if event_type == "clicked" and isinstance(url, str) and url:
        bump_link_clicks(delivery, url)
    if delivery.channel == Channel.IN_APP and _inbox_state(delivery) != inbox_state:
        # Every open tab of the recipient hears of it after the commit (see inbox.outbox).
        note_state_change(delivery)
    return delivery


def _inbox_state(delivery: Delivery) -> tuple[datetime | None, ...]:
    return (delivery.seen_at, delivery.read_at, delivery.clicked_at, delivery.archived_at)


def _counter(delivery: Delivery, metric: str, at: datetime) -> CounterRow:
    return CounterRow(delivery.campaign_id, delivery.template_id, delivery.channel, metric, at)


def suppress_address(
    channel: Channel | str,
    address: str | None,
    reason: SuppressionReason,
    *,
    delivery_id: int | None = None,
) -> None:
    """Add an address to the suppression list (once)."""
    if not address:
        return
    stmt = (
        insert(Suppression)
        .values(
            organization_id=require_organization_id(),
            channel=Channel(channel),
            address=address.strip().lower(),
            reason=reason,
            delivery_id=delivery_id,
        )
        .on_conflict_do_nothing(constraint="uq_suppressions_organization_id_channel_address")
    )
    db.session.execute(stmt)
