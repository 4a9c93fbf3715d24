"""Helpers for send-path tests: real RQ workers on real Redis, inside the test transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from sqlalchemy import func, select

from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.deliveries.models import Delivery, DeliveryStat, StatScope
from whistle_web.deliveries.services import FUNNEL_STEPS, funnel, rebuild_stats
from whistle_web.extensions import db
from whistle_web.models import Category, Provider
from whistle_web.tenancy import organization_scope
from workers.queues import QUEUES
from workers.worker import WhistleSimpleWorker

CONTENT = {
    "email": {
        "subject": "Hello {{ recipient.name or 'there' }}",
        "html": "<p>Hi {{ recipient.name }}, see <a href='https://example.com/x'>this</a></p>",
        "text": "Hi {{ recipient.name }} ({{ data.reason | default('no reason') }})",
    },
    "sms": {"text": "Code {{ data.code }}"},
    "push": {"title": "Ping", "body": "{{ data.reason }}"},
    "in_app": {"title": "Hello {{ recipient.name }}", "body": "{{ data.reason }}"},
}


def run_jobs(redis: Any) -> int:
    """Run every queued job in this process (a real RQ worker, burst mode).

    What the test wrote is committed first (in the test's transaction, rolled back at its
    end): a worker sees only committed data, and the worker class rolls back its session
    after every job, which would otherwise undo the test's uncommitted fixtures.

    Returns:
        How many jobs finished successfully.
    """

    def finished() -> int:
        return sum(FinishedJobRegistry(q, connection=redis).count for q in QUEUES)

    db.session.commit()
    before = finished()
    WhistleSimpleWorker(list(QUEUES), connection=redis).work(burst=True)
    failed = sum(FailedJobRegistry(q, connection=redis).count for q in QUEUES)
    assert failed == 0, _failures(redis)
    return finished() - before


def _failures(redis: Any) -> str:
    from rq.job import Job

    return "\n".join(
        Job.fetch(job_id, connection=redis).latest_result().exc_string
        for q in QUEUES
        for job_id in FailedJobRegistry(q, connection=redis).get_job_ids()
    )


@pytest.fixture
def small_batches(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Planner batches of 10: a few recipients make several batches, or planning slices."""
    from whistle_web.deliveries import planner

    monkeypatch.setattr(planner, "BATCH_SIZE", 10)


@pytest.fixture
def jobs(redis) -> Callable[[], int]:  # type: ignore[no-untyped-def]
    return lambda: run_jobs(redis)


@pytest.fixture
def statuses(org) -> Callable[..., dict[str, int]]:  # type: ignore[no-untyped-def]
    def count(*where: Any) -> dict[str, int]:
        with organization_scope(org.id):
            rows = db.session.execute(
                select(Delivery.status, func.count()).where(*where).group_by(Delivery.status)
            ).all()
        return {str(status): n for status, n in rows}

    return count


@pytest.fixture
def in_app_provider(org) -> Provider:  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        provider = Provider(channel=Channel.IN_APP, kind=ProviderKind.IN_APP, name="Inbox")
        provider.set_credentials({})
        db.session.add(provider)
        db.session.flush()
    return provider


@pytest.fixture
def category(org) -> Callable[..., Category]:  # type: ignore[no-untyped-def]
    def make(key: str = "updates", *, critical: bool = False, channels=None) -> Category:  # type: ignore[no-untyped-def]
        with organization_scope(org.id):
            category = Category(
                key=key, name=key.title(), critical=critical, default_channels=channels or []
            )
            db.session.add(category)
            db.session.flush()
        return category

    return make


def assert_counters_match_ledger(org_id: int, scope: StatScope, scope_id: int) -> dict[str, int]:
    """The live funnel counters, every step and every suppression, failure and bounce
    reason, equal a fresh recount of the ledger."""
    with organization_scope(org_id):
        live = funnel(scope, scope_id)
        savepoint = db.session.begin_nested()
        rebuild_stats(scope, scope_id)
        rebuilt = funnel(scope, scope_id)
        savepoint.rollback()
        assert db.session.scalar(select(func.count()).select_from(DeliveryStat)) >= 0
    reasons = ("suppressed:", "failed:", "bounced:")
    for channel in set(rebuilt) | set(live):
        metrics = rebuilt.get(channel, {})
        found = {m for m in (*metrics, *live.get(channel, {})) if m.startswith(reasons)}
        for metric in [*FUNNEL_STEPS, *sorted(found)]:
            assert live.get(channel, {}).get(metric, 0) == metrics.get(metric, 0), (
                channel,
                metric,
                live,
                rebuilt,
            )
    return live["all"]
