"""Recipient CSV imports: the upload waits in Redis, a job validates and imports it.

The job reports its progress in its meta (``state``, ``phase``, ``done``, ``total``,
``errors``, ``counts``) for the console's progress bar; the meta also names the
organization, so one organization never sees another's import.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict
from typing import Any

from rq import Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job

from whistle_web import get_redis
from whistle_web.errors import Actor
from whistle_web.recipients.csv_io import MAX_REPORTED_ERRORS, apply_import, parse_import
from whistle_web.tenancy import organization_scope
from workers.queues import LOW

log = logging.getLogger(__name__)

UPLOAD_TTL = 3600
RESULT_TTL = 24 * 3600


def _upload_key(import_id: str) -> str:
    return f"whistle:import:{import_id}"


def job_id(import_id: str) -> str:
    return f"import-{import_id}"


def enqueue_import(data: bytes, *, organization_id: int, actor: Actor) -> str:
    """Keep the upload in Redis and enqueue its import; returns the import id."""
    import_id = uuid.uuid4().hex
    redis = get_redis()
    redis.set(_upload_key(import_id), data, ex=UPLOAD_TTL)
    Queue(LOW, connection=redis).enqueue(
        import_recipients,
        args=(import_id, organization_id, actor.id, actor.label),
        job_id=job_id(import_id),
        meta={"organization_id": organization_id, "state": "queued", "done": 0, "total": 0},
        result_ttl=RESULT_TTL,
        failure_ttl=RESULT_TTL,
        description=f"import recipients {import_id}",
    )
    return import_id


def import_status(import_id: str, organization_id: int) -> dict[str, Any] | None:
    """The import's progress, or None when it does not exist in this organization."""
    try:
        job = Job.fetch(job_id(import_id), connection=get_redis())
    except NoSuchJobError:
        return None
    meta = job.get_meta(refresh=True)
    if meta.get("organization_id") != organization_id:
        return None
    status = dict(meta)
    if job.is_failed:
        status["state"] = "failed"
    return status


def import_recipients(
    import_id: str, organization_id: int, actor_id: int | None, actor_label: str
) -> dict[str, Any]:
    """Validate every row; import all of them in one transaction only if none is invalid."""
    job = get_current_job()
    redis = get_redis()

    def report(**values: Any) -> None:
        if job is not None:
            job.meta.update(values)
            job.save_meta()

    def progress(phase: str, done: int, total: int) -> None:
        report(state="running", phase=phase, done=done, total=total)

    data = redis.get(_upload_key(import_id))
    if data is None:
        report(state="failed", errors=[{"line": 0, "field": "file", "message": "Expired."}])
        return {"state": "failed"}
    actor = Actor("user" if actor_id else "system", actor_id, actor_label)
    with organization_scope(organization_id):
        progress("validating", 0, 0)
        profiles, errors = parse_import(data, progress)
        if errors:
            report(
                state="invalid",
                error_count=len(errors),
                errors=[asdict(e) for e in errors[:MAX_REPORTED_ERRORS]],
            )
            log.info("import %s refused: %d invalid rows", import_id, len(errors))
            redis.delete(_upload_key(import_id))
            return {"state": "invalid", "errors": len(errors)}
        counts = apply_import(profiles, actor=actor, progress=progress)
    redis.delete(_upload_key(import_id))
    report(state="done", phase="done", done=counts["rows"], total=counts["rows"], counts=counts)
    log.info("import %s: %s", import_id, counts)
    return {"state": "done", **counts}
