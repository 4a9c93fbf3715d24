"""Funnel counters derived from the delivery ledger."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, Text, and_, cast, delete, func, literal, select, text
from sqlalchemy.dialects.postgresql import insert

from whistle_web.deliveries.failures import FailureReason
from whistle_web.deliveries.models import (
    Delivery,
    DeliveryLinkStat,
    DeliveryStat,
    StatScope,
)
from whistle_web.deliveries.status import DeliveryStatus
from whistle_web.extensions import db
from whistle_web.tenancy import require_organization_id

# Funnel steps and the ledger fact that proves a delivery reached each of them.
FUNNEL_STEPS = {
    "targeted": literal(True),
    "suppressed": Delivery.status == DeliveryStatus.SUPPRESSED,
    "queued": Delivery.status != DeliveryStatus.SUPPRESSED,
    "sent": Delivery.sent_at.is_not(None),
    "delivered": Delivery.delivered_at.is_not(None),
    "seen": Delivery.seen_at.is_not(None),
    "read": Delivery.read_at.is_not(None),
    "clicked": Delivery.clicked_at.is_not(None),
    "failed": Delivery.status == DeliveryStatus.FAILED,
    "bounced": Delivery.status == DeliveryStatus.BOUNCED,
    "cancelled": Delivery.status == DeliveryStatus.CANCELLED,
    "archived": Delivery.archived_at.is_not(None),
}


def _ledger_counts(scope: StatScope, where: list) -> list[Select]:  # type: ignore[type-arg]
    bucket = func.date_trunc("hour", Delivery.created_at)
    scope_id = {
        StatScope.ORGANIZATION: Delivery.organization_id,
        StatScope.CAMPAIGN: Delivery.campaign_id,
        StatScope.TEMPLATE: Delivery.template_id,
    }[scope]
    selects = []
    for metric, condition in FUNNEL_STEPS.items():
        selects.append(
            select(
                Delivery.organization_id,
                literal(scope.value).label("scope"),
                scope_id.label("scope_id"),
                Delivery.channel,
                literal(metric).label("metric"),
                bucket.label("bucket"),
                func.count().label("value"),
            )
            .where(*where, condition, scope_id.is_not(None))
            .group_by(Delivery.organization_id, scope_id, Delivery.channel, bucket)
        )
    reasons = (
        select(
            Delivery.organization_id,
            literal(scope.value).label("scope"),
            scope_id.label("scope_id"),
            Delivery.channel,
            func.concat(
                "suppressed:", func.coalesce(cast(Delivery.suppression_reason, Text), "unknown")
            ).label("metric"),
            bucket.label("bucket"),
            func.count().label("value"),
        )
        .where(*where, Delivery.status == DeliveryStatus.SUPPRESSED, scope_id.is_not(None))
        .group_by(
            Delivery.organization_id,
            scope_id,
            Delivery.channel,
            bucket,
            Delivery.suppression_reason,
        )
    )
    failures = (
        select(
            Delivery.organization_id,
            literal(scope.value).label("scope"),
            scope_id.label("scope_id"),
            Delivery.channel,
            func.concat(
                cast(Delivery.status, Text),
                ":",
                func.coalesce(cast(Delivery.failure_reason, Text), FailureReason.OTHER.value),
            ).label("metric"),
            bucket.label("bucket"),
            func.count().label("value"),
        )
        .where(
            *where,
            Delivery.status.in_([DeliveryStatus.FAILED, DeliveryStatus.BOUNCED]),
            scope_id.is_not(None),
        )
        .group_by(
            Delivery.organization_id,
            scope_id,
            Delivery.channel,
            bucket,
            Delivery.status,
            Delivery.failure_reason,
        )
    )
    return [*selects, reasons, failures]


def rebuild_link_stats(scope: StatScope, scope_id: int) -> int:
    """Recount the clicks per link of a campaign or template from its "clicked" events.

    Events older than the retention period (deliveries/retention.py) are gone, so a recount
    of an old campaign may find fewer clicks than the live counters had.

    Returns:
        The number of link rows written.
    """
    column = {StatScope.CAMPAIGN: "campaign_id", StatScope.TEMPLATE: "template_id"}[scope]
    db.session.execute(
        delete(DeliveryLinkStat).where(
            DeliveryLinkStat.scope == scope, DeliveryLinkStat.scope_id == scope_id
        )
    )
    # Each delivery's events by ix_delivery_events_delivery alone: an organization condition
    # on the events (what the ORM's tenant filter adds) made PostgreSQL, without fresh
    # statistics, scan the organization's whole event index once per delivery.
    result = db.session.execute(
        text(
            "INSERT INTO delivery_link_stats"  # noqa: S608 (column is one of two names)
            " (organization_id, scope, scope_id, channel, url_hash, url, clicks)"
            f" SELECT d.organization_id, :scope, d.{column}, d.channel, md5(e.url), e.url,"
            " count(*) FROM deliveries AS d CROSS JOIN LATERAL ("
            "  SELECT ev.data ->> 'url' AS url FROM delivery_events AS ev"
            "  WHERE ev.delivery_id = d.id AND ev.type = 'clicked'"
            "  AND jsonb_typeof(ev.data -> 'url') = 'string') AS e"
            f" WHERE d.organization_id = :org AND d.{column} = :id"
            f" GROUP BY d.organization_id, d.{column}, d.channel, e.url"
        ),
        {"scope": scope.value, "org": require_organization_id(), "id": scope_id},
    )
    return result.rowcount or 0


def rebuild_stats(scope: StatScope, scope_id: int) -> int:
    """Recompute one scope's funnel counters from the ledger (backfill and repair), and a
    campaign's or template's clicks per link from the click events.

    Totals equal the live counters; the hourly split follows each delivery's creation hour,
    where live counters use the hour each step happened.

    Returns:
        The number of counter rows written.
    """
    org_id = require_organization_id()
    # Only the ledger-derived metrics are rebuilt; event counters (event:*) are kept.
    db.session.execute(
        delete(DeliveryStat).where(
            DeliveryStat.scope == scope,
            DeliveryStat.scope_id == scope_id,
            DeliveryStat.metric.in_(list(FUNNEL_STEPS))
            | DeliveryStat.metric.like("suppressed:%")
            | DeliveryStat.metric.like("failed:%")
            | DeliveryStat.metric.like("bounced:%"),
        )
    )
    column = {
        StatScope.ORGANIZATION: Delivery.organization_id,
        StatScope.CAMPAIGN: Delivery.campaign_id,
        StatScope.TEMPLATE: Delivery.template_id,
    }[scope]
    where = [and_(Delivery.organization_id == org_id, column == scope_id)]
    written = 0
    for query in _ledger_counts(scope, where):
        stmt = insert(DeliveryStat).from_select(
            ["organization_id", "scope", "scope_id", "channel", "metric", "bucket", "value"], query
        )
        written += db.session.execute(stmt).rowcount or 0
    if scope != StatScope.ORGANIZATION:
        written += rebuild_link_stats(scope, scope_id)
    return written


def funnel(scope: StatScope, scope_id: int) -> dict[str, dict[str, int]]:
    """Counts per funnel metric, overall (``"all"``) and per channel, from the counters."""
    rows = db.session.execute(
        select(DeliveryStat.channel, DeliveryStat.metric, func.sum(DeliveryStat.value))
        .where(DeliveryStat.scope == scope, DeliveryStat.scope_id == scope_id)
        .group_by(DeliveryStat.channel, DeliveryStat.metric)
    ).all()
    result: dict[str, dict[str, int]] = {"all": dict.fromkeys(FUNNEL_STEPS, 0)}
    for channel, metric, value in rows:
        per_channel = result.setdefault(str(channel), dict.fromkeys(FUNNEL_STEPS, 0))
        per_channel[metric] = per_channel.get(metric, 0) + int(value)
        result["all"][metric] = result["all"].get(metric, 0) + int(value)
    return result


def funnel_totals(scope: StatScope, scope_ids: list[int]) -> dict[int, dict[str, int]]:
    """Counts per funnel metric, all channels together, for several scopes in one query."""
    if not scope_ids:
        return {}
    rows = db.session.execute(
        select(DeliveryStat.scope_id, DeliveryStat.metric, func.sum(DeliveryStat.value))
        .where(DeliveryStat.scope == scope, DeliveryStat.scope_id.in_(scope_ids))
        .where(DeliveryStat.metric.in_(list(FUNNEL_STEPS)))
        .group_by(DeliveryStat.scope_id, DeliveryStat.metric)
    ).all()
    result = {scope_id: dict.fromkeys(FUNNEL_STEPS, 0) for scope_id in scope_ids}
    for scope_id, metric, value in rows:
        result[scope_id][metric] = int(value)
    return result


# Steps drawn in the time series of a funnel page and the dashboard.
SERIES_METRICS = ("sent", "delivered", "seen", "read", "clicked", "failed", "bounced")


def funnel_breakdown(scope: StatScope, scope_id: int) -> dict[str, dict[str, int]]:
    """Every counter of one scope, per channel: the funnel steps and the per-reason metrics
    (``suppressed:<reason>``, ``failed:<reason>``, ``bounced:<reason>``, ``event:<type>``).

    One ``GROUP BY`` over the counter rows of the scope (the unique key's prefix), never the
    ledger. ``"all"`` sums the channels.
    """
    rows = db.session.execute(
        select(DeliveryStat.channel, DeliveryStat.metric, func.sum(DeliveryStat.value))
        .where(DeliveryStat.scope == scope, DeliveryStat.scope_id == scope_id)
        .group_by(DeliveryStat.channel, DeliveryStat.metric)
    ).all()
    result: dict[str, dict[str, int]] = {"all": dict.fromkeys(FUNNEL_STEPS, 0)}
    for channel, metric, value in rows:
        for key in ("all", str(channel)):
            metrics = result.setdefault(key, dict.fromkeys(FUNNEL_STEPS, 0))
            metrics[metric] = metrics.get(metric, 0) + int(value)
    return result


def funnel_span(scope: StatScope, scope_id: int) -> tuple[Any, Any] | None:
    """The first and last hourly bucket holding a counter of the scope; None when empty."""
    first, last = db.session.execute(
        select(func.min(DeliveryStat.bucket), func.max(DeliveryStat.bucket)).where(
            DeliveryStat.scope == scope, DeliveryStat.scope_id == scope_id
        )
    ).one()
    return None if first is None else (first, last)


def funnel_series(
    scope: StatScope,
    scope_ids: list[int],
    *,
    since: Any,
    until: Any,
    unit: str = "hour",
    channel: str | None = None,
    metrics: tuple[str, ...] = SERIES_METRICS,
) -> list[tuple[Any, int, str, str, int]]:
    """(period start, scope id, channel, metric, value) rows, ``unit`` "hour" or "day"
    (UTC), for buckets in ``[since, until)``, from the counters."""
    if unit not in ("hour", "day"):
        raise ValueError(f"unknown unit {unit!r}")
    # Periods in UTC whatever the session's time zone.
    period = func.date_trunc(unit, DeliveryStat.bucket, "UTC")
    query = (
        select(
            period,
            DeliveryStat.scope_id,
            DeliveryStat.channel,
            DeliveryStat.metric,
            func.sum(DeliveryStat.value),
        )
        .where(
            DeliveryStat.scope == scope,
            DeliveryStat.scope_id.in_(scope_ids),
            DeliveryStat.metric.in_(list(metrics)),
            DeliveryStat.bucket >= since,
            DeliveryStat.bucket < until,
        )
        .group_by(period, DeliveryStat.scope_id, DeliveryStat.channel, DeliveryStat.metric)
        .order_by(period)
    )
    if channel is not None:
        query = query.where(DeliveryStat.channel == channel)
    return [
        (moment, int(sid), str(ch), metric, int(value))
        for moment, sid, ch, metric, value in db.session.execute(query).all()
    ]


def scope_totals_since(
    scope: StatScope, since: Any, metrics: tuple[str, ...]
) -> dict[int, dict[str, int]]:
    """Per scope id, the sum of ``metrics`` over counters from ``since`` on (every scope
    of the kind with activity in the window)."""
    rows = db.session.execute(
        select(DeliveryStat.scope_id, DeliveryStat.metric, func.sum(DeliveryStat.value))
        .where(
            DeliveryStat.scope == scope,
            DeliveryStat.bucket >= since,
            DeliveryStat.metric.in_(list(metrics)),
        )
        .group_by(DeliveryStat.scope_id, DeliveryStat.metric)
    ).all()
    result: dict[int, dict[str, int]] = {}
    for scope_id, metric, value in rows:
        result.setdefault(int(scope_id), dict.fromkeys(metrics, 0))[metric] = int(value)
    return result


def top_clicked_links(
    scope: StatScope, scope_id: int, *, channel: str | None = None, limit: int = 10
) -> list[tuple[str, int]]:
    """(url, clicks) of a campaign's or template's most clicked links, from the per-link
    counters (``delivery_link_stats``): a row per link and channel, never the events."""
    clicks = func.sum(DeliveryLinkStat.clicks)
    query = (
        select(DeliveryLinkStat.url, clicks)
        .where(DeliveryLinkStat.scope == scope, DeliveryLinkStat.scope_id == scope_id)
        .group_by(DeliveryLinkStat.url_hash, DeliveryLinkStat.url)
        .order_by(clicks.desc(), DeliveryLinkStat.url)
        .limit(limit)
    )
    if channel is not None:
        query = query.where(DeliveryLinkStat.channel == channel)
    return [(str(u), int(c)) for u, c in db.session.execute(query).all()]
