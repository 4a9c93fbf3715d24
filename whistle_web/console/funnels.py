"""Delivery funnels: per campaign and per template, per channel, from the funnel counters.

Every number on the page comes from the counters (deliveries/services.py): ``delivery_stats``
for the funnel, ``delivery_link_stats`` for the top clicked links (loaded separately); the
ledger and its events are never counted.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Response, abort, request
from sqlalchemy import select

from whistle_web.channels.kinds import Channel
from whistle_web.console.access import render, requires
from whistle_web.console.views import bp
from whistle_web.deliveries.failures import FailureReason
from whistle_web.deliveries.services import (
    FUNNEL_STEPS,
    funnel_breakdown,
    funnel_series,
    funnel_span,
    top_clicked_links,
)
from whistle_web.extensions import db
from whistle_web.models import Campaign, StatScope, Template

MAX_ID = 2**63 - 1
CHANNELS = frozenset(c.value for c in Channel)
# Steps of the funnel in order, with their labels; suppressed branches off targeted.
STEPS = (
    ("targeted", "Targeted"),
    ("suppressed", "Suppressed"),
    ("queued", "Queued"),
    ("sent", "Sent"),
    ("delivered", "Delivered"),
    ("seen", "Seen / opened"),
    ("read", "Read"),
    ("clicked", "Clicked"),
)
# The step each conversion rate is measured against.
BASE = {
    "suppressed": "targeted",
    "queued": "targeted",
    "sent": "queued",
    "delivered": "sent",
    "seen": "delivered",
    "read": "seen",
    "clicked": "read",
}
SERIES = (
    ("sent", "Sent"),
    ("delivered", "Delivered"),
    ("seen", "Seen / opened"),
    ("clicked", "Clicked"),
)
HOURLY_UP_TO = timedelta(days=3)
MAX_SPAN = timedelta(days=92)
CHART_W, CHART_H, PAD = 640, 200, 36


@dataclass
class Step:
    metric: str
    label: str
    value: int
    rate: float | None  # of the base step
    of_targeted: float | None
    base: str | None


@dataclass
class Funnel:
    """One scope's funnel, ready for the template and the CSV."""

    kind: str  # "campaign" or "template"
    subject: Any
    channel: str | None
    channels: list[str]
    steps: list[Step]
    per_channel: dict[str, list[Step]]
    suppressed: list[tuple[str, int]]
    failed: list[tuple[str, int]]
    bounced: list[tuple[str, int]]
    events: list[tuple[str, int]]
    totals: dict[str, int] = field(default_factory=dict)
    unit: str = "hour"
    since: datetime | None = None
    until: datetime | None = None
    series: list[dict[str, Any]] = field(default_factory=list)
    chart: dict[str, Any] | None = None

    @property
    def empty(self) -> bool:
        return not self.steps[0].value

    def step(self, metric: str) -> Step:
        return next(s for s in self.steps if s.metric == metric)


def _steps(metrics: dict[str, int]) -> list[Step]:
    targeted = metrics.get("targeted", 0)
    steps = []
    for metric, label in STEPS:
        value = metrics.get(metric, 0)
        base = BASE.get(metric)
        base_value = metrics.get(base, 0) if base else 0
        steps.append(
            Step(
                metric,
                label,
                value,
                value / base_value if base and base_value else None,
                value / targeted if targeted else None,
                base,
            )
        )
    return steps


def _reasons(metrics: dict[str, int], prefix: str) -> list[tuple[str, int]]:
    return sorted(
        ((m.split(":", 1)[1], v) for m, v in metrics.items() if m.startswith(prefix) and v),
        key=lambda item: (-item[1], item[0]),
    )


def _by_reason(metrics: dict[str, int], status: str) -> list[tuple[str, int]]:
    """``status:<reason>`` counts; what the reasons leave of the total (failures counted
    before reasons were, until ``rebuild_stats``) shows as "other"."""
    reasons = dict(_reasons(metrics, f"{status}:"))
    rest = metrics.get(status, 0) - sum(reasons.values())
    if rest > 0:
        reasons[FailureReason.OTHER.value] = reasons.get(FailureReason.OTHER.value, 0) + rest
    return sorted(reasons.items(), key=lambda item: (-item[1], item[0]))


def _utc(moment: datetime) -> datetime:
    """An aware UTC datetime (psycopg returns timestamptz in the session's time zone)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _window(span: tuple[datetime, datetime]) -> tuple[datetime, datetime, str]:
    first, last = (_utc(moment) for moment in span)
    first = max(first, last - MAX_SPAN)
    if last - first < HOURLY_UP_TO:
        return first, last + timedelta(hours=1), "hour"
    start = first.replace(hour=0)
    return start, last.replace(hour=0) + timedelta(days=1), "day"


def _periods(since: datetime, until: datetime, unit: str) -> list[datetime]:
    step = timedelta(hours=1) if unit == "hour" else timedelta(days=1)
    periods, moment = [], since
    while moment < until:
        periods.append(moment)
        moment += step
    return periods


def _chart(series: list[dict[str, Any]], unit: str) -> dict[str, Any] | None:
    """Polyline points and axis labels for the time series (server-rendered SVG)."""
    if not series:
        return None
    peak = max((row[m] for row in series for m, _ in SERIES), default=0) or 1
    n = len(series)
    inner_w, inner_h = CHART_W - 2 * PAD, CHART_H - 2 * PAD

    def x(i: int) -> float:
        return PAD + (inner_w * i / (n - 1) if n > 1 else inner_w / 2)

    def y(v: int) -> float:
        return PAD + inner_h - inner_h * v / peak

    lines = [
        {
            "metric": metric,
            "label": label,
            "points": " ".join(f"{x(i):.1f},{y(row[metric]):.1f}" for i, row in enumerate(series)),
        }
        for metric, label in SERIES
    ]
    fmt = "%m-%d %H:00" if unit == "hour" else "%Y-%m-%d"
    ticks = sorted({0, n // 2, n - 1})
    return {
        "width": CHART_W,
        "height": CHART_H,
        "pad": PAD,
        "peak": peak,
        "lines": lines,
        "x_labels": [(x(i), series[i]["period"].strftime(fmt)) for i in ticks],
        "baseline": PAD + inner_h,
        "right": CHART_W - PAD,
    }


def build_funnel(
    kind: str, subject: Any, channel: str | None = None, *, keep_channel: bool = False
) -> Funnel:
    """The funnel of a campaign or template; narrowed to ``channel`` when it has sent on it
    (or, with ``keep_channel``, whenever it is a channel: a comparison stays on one channel
    even if the other campaign never used it)."""
    scope = StatScope.CAMPAIGN if kind == "campaign" else StatScope.TEMPLATE
    breakdown = funnel_breakdown(scope, subject.id)
    channels = sorted(k for k in breakdown if k != "all")
    if channel not in channels and not (keep_channel and channel in CHANNELS):
        channel = None
    metrics = breakdown.get(channel or "all") or dict.fromkeys(FUNNEL_STEPS, 0)
    result = Funnel(
        kind=kind,
        subject=subject,
        channel=channel,
        channels=channels,
        steps=_steps(metrics),
        per_channel={c: _steps(breakdown[c]) for c in channels},
        suppressed=_reasons(metrics, "suppressed:"),
        failed=_by_reason(metrics, "failed"),
        bounced=_by_reason(metrics, "bounced"),
        events=_reasons(metrics, "event:"),
        totals=metrics,
    )
    span = funnel_span(scope, subject.id)
    if span is None:
        return result
    since, until, unit = _window(span)
    rows = funnel_series(
        scope,
        [subject.id],
        since=since,
        until=until,
        unit=unit,
        channel=channel,
        metrics=tuple(m for m, _ in SERIES),
    )
    table: dict[datetime, dict[str, Any]] = {
        p: {"period": p, **dict.fromkeys((m for m, _ in SERIES), 0)}
        for p in _periods(since, until, unit)
    }
    for moment, _sid, _ch, metric, value in rows:
        moment = _utc(moment)
        table.setdefault(moment, {"period": moment, **dict.fromkeys((m for m, _ in SERIES), 0)})
        table[moment][metric] += value
    result.unit, result.since, result.until = unit, since, until
    result.series = [table[p] for p in sorted(table)]
    result.chart = _chart(result.series, unit)
    return result


def _campaign(campaign_id: int) -> Campaign:
    found = (
        db.session.scalar(select(Campaign).where(Campaign.id == campaign_id))
        if 0 < campaign_id <= MAX_ID
        else None
    )
    if found is None:
        abort(404)
    return found


def _template(template_id: int) -> Template:
    found = (
        db.session.scalar(select(Template).where(Template.id == template_id))
        if 0 < template_id <= MAX_ID
        else None
    )
    if found is None:
        abort(404)
    return found


def _compare_id(value: str) -> int | None:
    """The campaign id in ``?compare=``; None unless ASCII digits ("²".isdigit() is true)."""
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() else None


def _channel_arg() -> str | None:
    return request.args.get("channel") or None


def _page(kind: str, subject: Any) -> Any:
    funnel = build_funnel(kind, subject, _channel_arg())
    other, compare_error = None, None
    compare_arg = request.args.get("compare", "").strip()
    if kind == "campaign" and compare_arg:
        compare_id = _compare_id(compare_arg)
        if compare_id is not None and compare_id != subject.id:
            other = build_funnel(kind, _campaign(compare_id), funnel.channel, keep_channel=True)
        else:
            compare_error = "Choose another campaign to compare with."
    choices = []
    if kind == "campaign":
        choices = db.session.execute(
            select(Campaign.id, Campaign.name)
            .where(Campaign.id != subject.id)
            .order_by(Campaign.launched_at.desc().nulls_last(), Campaign.id.desc())
            .limit(200)
        ).all()
    return render(
        "console/funnels/show.html",
        "console/funnels/_funnel.html",
        status=422 if compare_error else 200,
        funnel=funnel,
        other=other,
        compare_error=compare_error,
        choices=choices,
    )


def _csv(kind: str, subject: Any) -> Response:
    compare_id = _compare_id(request.args.get("compare", ""))
    funnels = [build_funnel(kind, subject, _channel_arg())]
    if kind == "campaign" and compare_id is not None and compare_id != subject.id:
        funnels.append(
            build_funnel(kind, _campaign(compare_id), funnels[0].channel, keep_channel=True)
        )
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([kind, f"{kind}_id", "section", "channel", "metric", "period", "value", "rate"])

    def row(
        f: Funnel, section: str, channel: str, metric: str, period: str, value: int, rate: Any
    ) -> None:
        name = str(f.subject.name)
        if name[:1] in ("=", "+", "-", "@", "\t", "\r"):
            name = "'" + name  # no formula injection in spreadsheets
        rate_text = "" if rate is None else f"{rate:.4f}"
        writer.writerow([name, f.subject.id, section, channel, metric, period, value, rate_text])

    for f in funnels:
        scope_channel = f.channel or "all"
        for step in f.steps:
            row(f, "funnel", scope_channel, step.metric, "", step.value, step.rate)
        for channel, steps in f.per_channel.items():
            if f.channel and channel != f.channel:
                continue
            for step in steps:
                row(f, "channel", channel, step.metric, "", step.value, step.rate)
        for reason, value in f.suppressed:
            row(f, "suppressed", scope_channel, reason, "", value, None)
        for reason, value in f.failed:
            row(f, "failed", scope_channel, reason, "", value, None)
        for reason, value in f.bounced:
            row(f, "bounced", scope_channel, reason, "", value, None)
        for point in f.series:
            for metric, _label in SERIES:
                period = point["period"].strftime("%Y-%m-%dT%H:%M:%SZ")
                row(f, f"series_{f.unit}", scope_channel, metric, period, point[metric], None)
    filename = f"{kind}-{subject.id}-funnel.csv"
    return Response(
        out.getvalue(),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _links(kind: str, subject: Any) -> Any:
    scope = StatScope.CAMPAIGN if kind == "campaign" else StatScope.TEMPLATE
    channel = _channel_arg()
    if channel not in CHANNELS:
        channel = None
    return render(
        "console/funnels/links.html",
        "console/funnels/_links.html",
        kind=kind,
        subject=subject,
        channel=channel,
        links=top_clicked_links(scope, subject.id, channel=channel),
    )


@bp.get("/campaigns/<int:campaign_id>/funnel")
@requires("view")
def campaign_funnel(campaign_id: int) -> Any:
    """The campaign's funnel; ``?channel=`` narrows it, ``?compare=<id>`` adds another."""
    return _page("campaign", _campaign(campaign_id))


@bp.get("/campaigns/<int:campaign_id>/funnel.csv")
@requires("view")
def campaign_funnel_csv(campaign_id: int) -> Any:
    return _csv("campaign", _campaign(campaign_id))


@bp.get("/campaigns/<int:campaign_id>/funnel/links")
@requires("view")
def campaign_funnel_links(campaign_id: int) -> Any:
    return _links("campaign", _campaign(campaign_id))


@bp.get("/templates/<int:template_id>/funnel")
@requires("view")
def template_funnel(template_id: int) -> Any:
    """Everything sent with the template (campaigns and API triggers), per channel."""
    return _page("template", _template(template_id))


@bp.get("/templates/<int:template_id>/funnel.csv")
@requires("view")
def template_funnel_csv(template_id: int) -> Any:
    return _csv("template", _template(template_id))


@bp.get("/templates/<int:template_id>/funnel/links")
@requires("view")
def template_funnel_links(template_id: int) -> Any:
    return _links("template", _template(template_id))
