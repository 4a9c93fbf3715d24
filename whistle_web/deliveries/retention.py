"""Retention: drop what is no longer worth keeping, in small chunks that never block sends.

Delivery events older than ``WHISTLE_EVENT_RETENTION_DAYS`` (default 400) are deleted; the
deliveries themselves and the funnel counters stay, so funnels and a recipient's story keep
their numbers and final states. Finished batches older than 30 days are deleted (they only
matter while work is in flight). Idempotency keys older than the 24-hour window are freed,
and expired staff refresh tokens are deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from whistle_web.extensions import db

CHUNK = 5_000
BATCH_RETENTION = timedelta(days=30)


@dataclass(frozen=True)
class RetentionReport:
    events: int
    batches: int
    idempotency_keys: int


def _delete_in_chunks(sql: str, **params: object) -> int:
    total = 0
    while True:
        # System-wide maintenance across organizations: plain SQL, on purpose.
        deleted = db.session.execute(text(sql), {**params, "chunk": CHUNK}).rowcount or 0
        db.session.commit()
        total += deleted
        if deleted < CHUNK:
            return total


def apply_retention(*, event_days: int, now: datetime | None = None) -> RetentionReport:
    now = now or datetime.now(UTC)
    events = _delete_in_chunks(
        "DELETE FROM delivery_events WHERE id IN ("
        " SELECT id FROM delivery_events WHERE occurred_at < :cutoff LIMIT :chunk)",
        cutoff=now - timedelta(days=event_days),
    )
    batches = _delete_in_chunks(
        "DELETE FROM delivery_batches WHERE id IN ("
        " SELECT id FROM delivery_batches WHERE status = 'done' AND finished_at < :cutoff"
        " LIMIT :chunk)",
        cutoff=now - BATCH_RETENTION,
    )
    day_ago = now - timedelta(hours=24)
    keys = db.session.execute(
        text(
            "UPDATE send_requests SET idempotency_key = NULL"
            " WHERE idempotency_key IS NOT NULL AND created_at < :cutoff"
        ),
        {"cutoff": day_ago},
    ).rowcount
    keys += _delete_in_chunks(
        "DELETE FROM api_idempotency_records WHERE id IN ("
        " SELECT id FROM api_idempotency_records WHERE created_at < :cutoff LIMIT :chunk)",
        cutoff=day_ago,
    )
    _delete_in_chunks(
        "DELETE FROM api_refresh_tokens WHERE id IN ("
        " SELECT id FROM api_refresh_tokens WHERE expires_at < :cutoff LIMIT :chunk)",
        cutoff=now,
    )
    db.session.commit()
    return RetentionReport(events=events, batches=batches, idempotency_keys=keys or 0)
