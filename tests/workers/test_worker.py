"""The worker classes ``whistle worker`` runs: a failed job leaves nothing to the next."""

from __future__ import annotations

import pytest
from rq import Queue, SimpleWorker
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from sqlalchemy import text

from whistle_web.extensions import db
from workers.worker import WhistleSimpleWorker

pytestmark = pytest.mark.committed


def fail_in_the_database() -> None:
    db.session.execute(text("SELECT 1 / 0"))


def leave_a_write_uncommitted() -> None:
    db.session.execute(text("CREATE TABLE worker_test_leftover (id int)"))


def read_the_database() -> int:
    return db.session.execute(text("SELECT 1")).scalar_one()


def _run(worker_class: type[SimpleWorker], redis, *funcs) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    queue = Queue("high", connection=redis)
    for func in funcs:
        queue.enqueue(func)
    worker_class([queue], connection=redis).work(burst=True)
    return (
        FinishedJobRegistry("high", connection=redis).count,
        FailedJobRegistry("high", connection=redis).count,
    )


def test_a_job_failing_in_the_database_does_not_fail_the_next(app, redis):  # type: ignore[no-untyped-def]
    assert _run(WhistleSimpleWorker, redis, fail_in_the_database, read_the_database) == (1, 1)


def test_rqs_own_simple_worker_would_fail_every_later_job(app, redis):  # type: ignore[no-untyped-def]
    """What the class is for: plain SimpleWorker passes the aborted transaction on."""
    try:
        assert _run(SimpleWorker, redis, fail_in_the_database, read_the_database) == (0, 2)
    finally:
        db.session.rollback()


def test_what_a_job_did_not_commit_is_rolled_back(app, redis):  # type: ignore[no-untyped-def]
    assert _run(WhistleSimpleWorker, redis, leave_a_write_uncommitted, read_the_database) == (2, 0)
    assert db.session.execute(text("SELECT to_regclass('worker_test_leftover')")).scalar() is None
