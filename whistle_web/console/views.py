"""Sign-in, sign-out and the dashboard."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required, logout_user
from sqlalchemy import func, select

from whistle_web.accounts.services import authenticate, memberships_of
from whistle_web.console.access import requires
from whistle_web.console.auth import reset_session
from whistle_web.console.forms import LoginForm
from whistle_web.deliveries.services import funnel_series, funnel_totals, scope_totals_since
from whistle_web.extensions import db
from whistle_web.models import (
    Campaign,
    CampaignStatus,
    Provider,
    Recipient,
    StatScope,
    Template,
)

bp = Blueprint("console", __name__)


def _safe_next(target: str | None) -> str | None:
    """Only follow same-site relative paths after sign-in (no open redirect)."""
    if not target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return None
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():  # type: ignore[no-untyped-def]
    if current_user.is_authenticated:
        return redirect(url_for("console.dashboard"))
    from whistle_web.console import account

    form = LoginForm()
    if form.validate_on_submit():
        email = (form.email.data or "").strip().lower()
        if not account.login_allowed(email):
            form.form_errors.append("Too many failed sign-ins. Wait a few minutes and try again.")
            return render_template("console/login.html", form=form), 429
        user = authenticate(email, form.password.data or "")
        memberships = memberships_of(user.id) if user is not None else []
        if user is not None and memberships:
            account.start_session(user, memberships[0].organization_id)
            user.last_login_at = datetime.now(UTC)
            db.session.commit()
            return redirect(_safe_next(request.args.get("next")) or url_for("console.dashboard"))
        account.record_login_failure(email)
        # One message whatever was wrong: no hint whether the email exists.
        form.form_errors.append("Email or password is incorrect.")
        return render_template("console/login.html", form=form), 401
    status = 422 if form.errors else 200
    return render_template("console/login.html", form=form), status


@bp.post("/logout")
@login_required
def logout():  # type: ignore[no-untyped-def]
    logout_user()
    reset_session()
    flash("You are signed out.", "info")
    return redirect(url_for("console.login"))


# A campaign whose failed and bounced deliveries exceed this share of those queued in the
# last 7 days (with at least FAILURE_MIN_QUEUED queued) needs attention.
FAILURE_THRESHOLD = 0.05
FAILURE_MIN_QUEUED = 20
SPARK_W, SPARK_H = 120, 28


def _sparkline(values: list[float | None]) -> str:
    """SVG polyline points for rates in [0, 1] (a missing day draws at 0)."""
    if not values:
        return ""
    step = SPARK_W / max(len(values) - 1, 1)
    return " ".join(
        f"{i * step:.1f},{SPARK_H - 2 - (SPARK_H - 4) * min(v or 0.0, 1.0):.1f}"
        for i, v in enumerate(values)
    )


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _week(org_id: int, now: datetime) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """Per channel: the last 7 days' totals, rates and a sparkline of each day's rates."""
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    days = [today - timedelta(days=n) for n in range(6, -1, -1)]
    rows = funnel_series(
        StatScope.ORGANIZATION,
        [org_id],
        since=days[0],
        until=today + timedelta(days=1),
        unit="day",
        metrics=("sent", "delivered", "seen", "clicked", "failed", "bounced"),
    )
    daily: dict[str, dict[Any, dict[str, int]]] = {}
    for moment, _sid, channel, metric, value in rows:
        day = moment.astimezone(UTC).date() if moment.tzinfo else moment.date()
        cell = daily.setdefault(channel, {}).setdefault(day, {})
        cell[metric] = cell.get(metric, 0) + value
    channels: dict[str, dict[str, Any]] = {}
    for channel, per_day in sorted(daily.items()):
        totals: dict[str, int] = {}
        for cell in per_day.values():
            for metric, value in cell.items():
                totals[metric] = totals.get(metric, 0) + value
        sent = totals.get("sent", 0)
        delivered = [
            _rate(
                per_day.get(d.date(), {}).get("delivered", 0),
                per_day.get(d.date(), {}).get("sent", 0),
            )
            for d in days
        ]
        engaged = [
            _rate(
                per_day.get(d.date(), {}).get("seen", 0), per_day.get(d.date(), {}).get("sent", 0)
            )
            for d in days
        ]
        channels[channel] = {
            "totals": totals,
            "delivered_rate": _rate(totals.get("delivered", 0), sent),
            "seen_rate": _rate(totals.get("seen", 0), sent),
            "clicked_rate": _rate(totals.get("clicked", 0), sent),
            "failed": totals.get("failed", 0) + totals.get("bounced", 0),
            "delivered_points": _sparkline(delivered),
            "engaged_points": _sparkline(engaged),
            "daily": [
                (d.date(), delivered[i], engaged[i], per_day.get(d.date(), {}).get("sent", 0))
                for i, d in enumerate(days)
            ],
        }
    return [d.date() for d in days], channels


def _failing_campaigns(since: datetime) -> list[dict[str, Any]]:
    totals = scope_totals_since(StatScope.CAMPAIGN, since, ("queued", "sent", "failed", "bounced"))
    failing = {
        campaign_id: metrics
        for campaign_id, metrics in totals.items()
        if metrics["queued"] >= FAILURE_MIN_QUEUED
        and (metrics["failed"] + metrics["bounced"]) / metrics["queued"] > FAILURE_THRESHOLD
    }
    if not failing:
        return []
    campaigns = db.session.scalars(select(Campaign).where(Campaign.id.in_(list(failing)))).all()
    result = [
        {
            "campaign": campaign,
            "failed": failing[campaign.id]["failed"],
            "bounced": failing[campaign.id]["bounced"],
            "rate": (failing[campaign.id]["failed"] + failing[campaign.id]["bounced"])
            / failing[campaign.id]["queued"],
        }
        for campaign in campaigns
    ]
    return sorted(result, key=lambda row: -row["rate"])


def _workers_view(org_id: int) -> tuple[list[Any] | None, int | None]:
    """Queue health and this organization's failed jobs; None when Redis does not answer."""
    from redis.exceptions import RedisError

    from whistle_web import get_redis
    from workers import monitoring

    try:
        connection = get_redis()
        return (
            monitoring.queue_health(connection),
            len(monitoring.failed_jobs(connection, org_id)),
        )
    except RedisError:
        return None, None


@bp.get("/")
@requires("view")
def dashboard():  # type: ignore[no-untyped-def]
    organization = g.organization
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    days, week = _week(organization.id, now)
    sends_today: dict[str, int] = {}
    for _moment, _sid, channel, _metric, value in funnel_series(
        StatScope.ORGANIZATION,
        [organization.id],
        since=today,
        until=today + timedelta(days=1),
        unit="day",
        metrics=("sent",),
    ):
        sends_today[channel] = sends_today.get(channel, 0) + value
    running = db.session.scalars(
        select(Campaign)
        .where(Campaign.status.in_([CampaignStatus.SENDING, CampaignStatus.PAUSED]))
        .order_by(Campaign.launched_at.desc().nulls_last(), Campaign.id.desc())
        .limit(20)
    ).all()
    scheduled = db.session.scalars(
        select(Campaign)
        .where(Campaign.status == CampaignStatus.SCHEDULED)
        .order_by(Campaign.next_run_at.nulls_last(), Campaign.send_at.nulls_last(), Campaign.id)
        .limit(20)
    ).all()
    recent = db.session.scalars(
        select(Campaign)
        .where(
            Campaign.status.in_(
                [CampaignStatus.COMPLETED, CampaignStatus.CANCELLED, CampaignStatus.FAILED]
            )
        )
        .order_by(Campaign.completed_at.desc().nulls_last(), Campaign.id.desc())
        .limit(5)
    ).all()
    disabled_providers = db.session.scalars(
        select(Provider)
        .where(Provider.enabled.is_(False))
        .order_by(Provider.channel, Provider.name)
    ).all()
    queues, failed_jobs = _workers_view(organization.id)
    return render_template(
        "console/dashboard.html",
        organization=organization,
        recipients=db.session.scalar(select(func.count()).select_from(Recipient)),
        templates=db.session.scalar(select(func.count()).select_from(Template)),
        sends_today=dict(sorted(sends_today.items())),
        sent_today=sum(sends_today.values()),
        days=days,
        week=week,
        spark=(SPARK_W, SPARK_H),
        running=running,
        scheduled=scheduled,
        recent=recent,
        recent_totals=funnel_totals(StatScope.CAMPAIGN, [c.id for c in recent]),
        failing=_failing_campaigns(now - timedelta(days=7)),
        threshold=FAILURE_THRESHOLD,
        disabled_providers=disabled_providers,
        queues=queues,
        failed_jobs=failed_jobs,
    )
