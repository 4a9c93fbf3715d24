"""The RQ worker classes ``whistle worker`` runs: no job inherits another's transaction.

A worker runs every job inside one application context (``whistle worker`` creates the app
once), so ``db.session`` outlives a job. A job that fails on a database error leaves that
session's transaction aborted, and in a ``SimpleWorker`` (the Procfile's) every later job
then failed with "current transaction is aborted", for as long as the process lived. After
every job, whatever its outcome, the session is rolled back: what the job did not commit is
undone, its connection goes back to the pool, and what it loaded is expired, so the next
job reads afresh. A job that committed leaves nothing to roll back (no round trip).
"""

from __future__ import annotations

from typing import Any

from rq import SimpleWorker, Worker

from whistle_web.extensions import db


class _SessionPerJob:
    def perform_job(self, job: Any, queue: Any, execution: Any) -> bool:
        try:
            return super().perform_job(job, queue, execution)  # type: ignore[misc, no-any-return]
        finally:
            db.session.rollback()


class WhistleWorker(_SessionPerJob, Worker):
    """Forks a work horse per job (``whistle worker``)."""


class WhistleSimpleWorker(_SessionPerJob, SimpleWorker):
    """Runs jobs in the worker process itself (``whistle worker --simple``, the Procfile's)."""
