"""Operations: queue health, workers, jobs per second, scheduled items, failed jobs with a
retry button, and the organization's audit log.

Queues, workers and the periodic ticks are shared by the whole install and shown as they
are; jobs belong to one organization (their arguments carry its id) and only this
organization's failed jobs are listed or retried (:mod:`workers.monitoring`). The audit log
is tenant-scoped like every other table.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from flask import abort, flash, g, redirect, request, url_for
from sqlalchemy import select

from whistle_web import get_redis
from whistle_web.campaigns.models import Campaign, CampaignStatus
from whistle_web.console.access import render, requires
from whistle_web.console.views import bp
from whistle_web.extensions import db, htmx
from whistle_web.organizations.services import audit_actions, audit_entries, record_audit
from workers import monitoring
from workers.maintenance import SCHEDULER_HEARTBEAT_KEY

AUDIT_PAGE_SIZE = 50
STALE_HEARTBEAT_SECONDS = 60


def _scheduler_heartbeat() -> datetime | None:
    raw = get_redis().get(SCHEDULER_HEARTBEAT_KEY)
    try:
        return datetime.fromtimestamp(float(raw), UTC) if raw else None
    except ValueError:
        return None


def _health() -> dict[str, Any]:
    connection = get_redis()
    workers = monitoring.workers(connection)
    return {
        "queues": monitoring.queue_health(connection),
        "workers": workers,
        "jobs_per_second": monitoring.jobs_per_second(connection, workers),
        "stale_after": STALE_HEARTBEAT_SECONDS,
        "scheduler_heartbeat": _scheduler_heartbeat(),
        "now": datetime.now(UTC),
    }


@bp.get("/operations")
@requires("manage")
def operations() -> Any:
    """Queues, workers, scheduled items and failed jobs at a glance."""
    connection = get_redis()
    scheduled_campaigns = db.session.scalars(
        select(Campaign)
        .where(Campaign.status == CampaignStatus.SCHEDULED)
        .order_by(Campaign.next_run_at.nulls_last(), Campaign.send_at.nulls_last(), Campaign.id)
        .limit(50)
    ).all()
    return render(
        "console/operations/index.html",
        "console/operations/_health.html",
        **_health(),
        periodic=monitoring.periodic_jobs(connection, g.organization.id),
        scheduled_campaigns=scheduled_campaigns,
        failed=monitoring.failed_jobs(connection, g.organization.id),
    )


@bp.post("/operations/jobs/<job_id>/retry")
@requires("manage")
def operations_job_retry(job_id: str) -> Any:
    """Put one of the organization's failed jobs back on its queue."""
    from whistle_web.console.access import actor

    job = monitoring.retry_failed_job(get_redis(), job_id, g.organization.id)
    if job is None:
        abort(404)
    record_audit(
        actor(), "job.retried", "job", job.id, {"queue": job.origin, "func": job.func_name}
    )
    db.session.commit()
    if htmx:
        return render(
            "console/operations/_failed.html",
            "console/operations/_failed.html",
            failed=monitoring.failed_jobs(get_redis(), g.organization.id),
            retried=job.id,
        )
    flash(f"Job {job.id} is queued again on {job.origin}.", "info")
    return redirect(url_for("console.operations"), 303)


def _day(value: str) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


@bp.get("/operations/audit")
@requires("manage")
def operations_audit() -> Any:
    """Who changed what: filter by action, actor and dates; newest first, page by page."""
    action = request.args.get("action", "")[:80]
    who = request.args.get("actor", "")[:320]
    since_text = request.args.get("since", "")
    until_text = request.args.get("until", "")
    since, until = _day(since_text), _day(until_text)
    errors = {}
    if since_text and since is None:
        errors["since"] = "Use a date like 2026-01-31."
    if until_text and until is None:
        errors["until"] = "Use a date like 2026-01-31."
    entries, next_cursor = audit_entries(
        action=action,
        actor=who,
        since=datetime.combine(since, time(), UTC) if since else None,
        until=datetime.combine(until, time(), UTC) + timedelta(days=1) if until else None,
        cursor=request.args.get("cursor"),
        limit=AUDIT_PAGE_SIZE,
    )
    filters = {"action": action, "actor": who, "since": since_text, "until": until_text}
    return render(
        "console/operations/audit.html",
        "console/operations/_audit_rows.html",
        status=422 if errors else 200,
        entries=entries,
        next_cursor=next_cursor,
        filters=filters,
        actions=audit_actions(),
        errors=errors,
        first_page=not request.args.get("cursor"),
    )
