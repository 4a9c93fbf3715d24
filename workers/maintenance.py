"""Housekeeping jobs run by the scheduler."""

from __future__ import annotations

import time

from whistle_web import get_redis

SCHEDULER_HEARTBEAT_KEY = "whistle:scheduler:heartbeat"


def record_scheduler_heartbeat() -> float:
    """Store when the scheduler last got a job through a worker (the operations page reads it)."""
    now = time.time()
    get_redis().set(SCHEDULER_HEARTBEAT_KEY, now, ex=600)
    return now


def run_tick() -> dict[str, int]:
    """Launch due campaigns and sends, release deferred deliveries, revive lost work."""
    from whistle_web.deliveries.sweeper import tick

    return tick()


def run_retention() -> dict[str, int]:
    """Delete old delivery events and finished batches; free expired idempotency keys."""
    from flask import current_app

    from whistle_web.deliveries.retention import apply_retention

    report = apply_retention(event_days=current_app.config["WHISTLE_EVENT_RETENTION_DAYS"])
    return {
        "events": report.events,
        "batches": report.batches,
        "idempotency_keys": report.idempotency_keys,
    }
