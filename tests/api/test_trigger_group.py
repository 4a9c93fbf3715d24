"""Triggers written together: concurrent requests' send requests go in one statement and
their planning in one Redis round trip, and each request still gets exactly its own answer,
in its own organization (production's case: no transaction open, so these tests commit)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue
from sqlalchemy import event, func, select, update

from tests.pipeline.conftest import CONTENT
from whistle_web.errors import Actor, ValidationError
from whistle_web.extensions import db
from whistle_web.group_commit import GroupCommit
from whistle_web.models import Recipient, SendRequest, Topic
from whistle_web.notifications import services
from whistle_web.notifications.services import trigger
from whistle_web.tenancy import organization_scope, unscoped
from workers.queues import HIGH

pytestmark = pytest.mark.committed
ACTOR = Actor("api_key", 1, "API key whk_test")


@pytest.fixture
def tenants(org, other_org, make_template, make_recipient):  # type: ignore[no-untyped-def]
    """Two organizations with the same template key and an external id in common."""
    make_template(org, "welcome", CONTENT)
    make_template(other_org, "welcome", {"in_app": CONTENT["in_app"]})
    ids = {
        (org.id, "u-1"): make_recipient(org, "u-1").id,
        (org.id, "u-2"): make_recipient(org, "u-2").id,
        (other_org.id, "u-1"): make_recipient(other_org, "u-1").id,
    }
    with organization_scope(org.id):
        topic = Topic(key="news", name="News")
        db.session.add(topic)
        db.session.flush()
    db.session.commit()
    return org.id, other_org.id, topic.id, ids


def held_group(app: Any, monkeypatch: pytest.MonkeyPatch, waiting: int) -> list[list[Any]]:
    """Make the app's trigger group hold its first batch until ``waiting`` triggers queue
    behind it, so that they are written together. Returns the batches."""
    batches: list[list[Any]] = []
    group: GroupCommit[Any, Any]

    def run(items: list[Any]) -> list[Any]:
        batches.append(items)
        if len(batches) == 1:
            deadline = time.monotonic() + 10
            while len(group._queue) < waiting:
                assert time.monotonic() < deadline, "the triggers never queued up"
                time.sleep(0.001)
        return services._write_group(items)

    group = GroupCommit(run)
    monkeypatch.setitem(app.extensions, "whistle.trigger_group", group)
    return batches


def planned(redis: Any) -> list[tuple[int, int]]:
    """The (send request, organization) pairs the queued planning jobs plan, sorted; a
    group's job plans several."""
    pairs: list[tuple[int, int]] = []
    for job in Queue(HIGH, connection=redis).get_jobs():
        if job.func_name == "workers.sending.plan_send_requests":
            pairs += [tuple(pair) for pair in job.args[0]]
        else:
            pairs.append(tuple(job.args))
    return sorted(pairs)


def run_concurrently(app: Any, calls: list[tuple[int, dict[str, Any]]]) -> list[Any]:
    """Trigger each (organization, arguments) from its own thread, with its own app context
    and session, as gunicorn's greenlets do. The first starts alone; the rest start once
    it is being written. Returns each outcome: (id, organization, audience, max recipient
    id) or the ValidationError's field errors."""
    outcomes: list[Any] = [None] * len(calls)

    def call(i: int) -> None:
        org_id, kwargs = calls[i]
        with app.app_context(), organization_scope(org_id):
            try:
                sr = trigger(actor=ACTOR, **kwargs)
                outcomes[i] = (sr.id, sr.organization_id, sr.audience, sr.max_recipient_id)
            except ValidationError as error:
                outcomes[i] = [(e.field, e.message) for e in error.errors]
            finally:
                db.session.remove()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    threads[0].start()
    group = app.extensions["whistle.trigger_group"]
    deadline = time.monotonic() + 10
    while group.batches == 0 and not group._running:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(20)
    return outcomes


def test_concurrent_triggers_are_written_together_each_in_its_own_organization(
    app, tenants, redis, monkeypatch
):  # type: ignore[no-untyped-def]
    a, b, topic_id, ids = tenants
    calls = [
        (a, {"template_key": "welcome", "to": ["u-1"]}),
        (a, {"template_key": "welcome", "to": ["u-2", "u-1", "u-2"], "data": {"n": 2}}),
        (b, {"template_key": "welcome", "to": ["u-1"], "channels": ["in_app"]}),
        (a, {"template_key": "welcome", "to": ["nobody"]}),
        (b, {"template_key": "missing", "to": ["u-1"]}),
        (b, {"template_key": "welcome", "to": ["u-2"]}),  # u-2 is the other tenant's
        (b, {"template_key": "welcome", "to": ["u-1"], "channels": ["email"]}),
        (a, {"template_key": "welcome", "topic": "news"}),
    ]
    # The topic's trigger read the topic in the session's transaction first: its statement
    # joins that transaction instead of the group.
    batches = held_group(app, monkeypatch, waiting=len(calls) - 2)
    statements: list[str] = []
    record = lambda *args: statements.append(args[2].split()[0])  # noqa: E731
    event.listen(db.engine, "before_cursor_execute", record)
    try:
        out = run_concurrently(app, calls)
    finally:
        event.remove(db.engine, "before_cursor_execute", record)

    assert [len(batch) for batch in batches] == [1, 6]
    assert statements.count("WITH") == 3  # the two batches' and the topic trigger's
    assert out[0][1:] == (a, {"type": "recipients", "ids": [ids[a, "u-1"]]}, None)
    assert out[1][1:] == (
        a,
        {"type": "recipients", "ids": sorted([ids[a, "u-1"], ids[a, "u-2"]])},
        None,
    )
    assert out[2][1:] == (b, {"type": "recipients", "ids": [ids[b, "u-1"]]}, None)
    assert out[3] == [("to[0]", "No recipient 'nobody'; send a profile object to create one.")]
    assert out[4] == [("template", "No template with key 'missing'.")]
    assert out[5] == [("to[0]", "No recipient 'u-2'; send a profile object to create one.")]
    assert out[6] == [("channels[0]", "The template has no email content.")]
    # A topic is bounded by its own organization's recipients, not the other's.
    assert out[7][1:] == (a, {"type": "topic", "id": topic_id}, max(ids[a, "u-1"], ids[a, "u-2"]))

    accepted = {o[0]: o[1] for o in out if isinstance(o, tuple)}
    with app.app_context():
        rows = db.session.execute(
            unscoped(select(SendRequest.id, SendRequest.organization_id, SendRequest.data))
        ).all()
        db.session.remove()
    assert {r.id: r.organization_id for r in rows} == accepted
    assert next(r.data for r in rows if r.id == out[1][0]) == {"n": 2}
    # Planning enqueued for exactly the written ones, each with its own organization: the
    # second batch's two by one job, the first's and the topic's by a job each.
    assert planned(redis) == sorted(accepted.items())
    assert len(Queue(HIGH, connection=redis).get_jobs()) == 3


def test_a_row_the_database_refuses_fails_only_its_own_trigger(app, tenants, redis):  # type: ignore[no-untyped-def]
    a, b, _, _ = tenants
    now = datetime.now(UTC)

    def pending(org_id: int, data: dict[str, Any]) -> services._Pending:
        values = {
            "kind": "trigger",
            "audience": None,
            "ids": [],
            "data": data,
            "channels": None,
            "idempotency_key": None,
            "send_at": now,
            "local_send_time": None,
            "bounded": False,
            "actor": ACTOR.label,
        }
        return services._Pending(services._statement_row(org_id, "welcome", ["u-1"], values), True)

    with app.app_context():
        # PostgreSQL's jsonb has no \u0000: the statement fails for the whole batch.
        outcomes = services._write_group(
            [pending(a, {"x": 1}), pending(b, {"x": "\u0000"}), pending(b, {"x": 3})]
        )
        rows = db.session.execute(
            unscoped(select(SendRequest.organization_id, SendRequest.data))
        ).all()
        db.session.remove()
    assert isinstance(outcomes[0], services._Written) and outcomes[0].row is not None
    assert "unsupported Unicode escape sequence" in str(outcomes[1])
    assert isinstance(outcomes[2], services._Written) and outcomes[2].row is not None
    assert sorted(rows) == [(a, {"x": 1}), (b, {"x": 3})]
    assert planned(redis) == [(outcomes[0].row[0], a), (outcomes[2].row[0], b)]


def test_a_written_trigger_is_accepted_when_redis_fails_and_the_sweeper_plans_it(
    app, tenants, redis, monkeypatch, caplog
):  # type: ignore[no-untyped-def]
    """A send request in the database is accepted: answering an error would make the
    caller send again, and the sweeper would plan both."""
    a, _, _, _ = tenants

    def down(*args: Any, **kwargs: Any) -> None:
        raise RedisConnectionError("Redis is restarting")

    monkeypatch.setattr("workers.sending.enqueue_plannings", down)
    with app.app_context(), organization_scope(a), caplog.at_level(logging.ERROR):
        sr = trigger("welcome", to=["u-1"], actor=ACTOR)
        request_id = sr.id
        db.session.remove()
    assert f"could not enqueue the planning of send requests [{request_id}]" in caplog.text
    assert Queue(HIGH, connection=redis).count == 0
    monkeypatch.undo()

    from whistle_web.deliveries.sweeper import start_due_send_requests

    with app.app_context():
        assert start_due_send_requests(datetime.now(UTC) + timedelta(minutes=10)) == 1
        db.session.remove()
    (job,) = Queue(HIGH, connection=redis).get_jobs()
    assert tuple(job.args) == (request_id, a)


def keyed(app: Any, org_id: int, key: str, **kwargs: Any) -> tuple[int, bool]:
    """Trigger "welcome" with an idempotency key in production's way: a session of its
    own with no transaction open. Returns the send request's id and ``replayed``."""
    with app.app_context(), organization_scope(org_id):
        try:
            sr = trigger("welcome", idempotency_key=key, actor=ACTOR, **{"to": ["u-1"], **kwargs})
            return sr.id, sr.replayed
        finally:
            db.session.remove()


def test_a_keyed_trigger_is_grouped_and_its_key_sends_once(app, tenants, redis, monkeypatch):  # type: ignore[no-untyped-def]
    a, b, _, _ = tenants
    calls = [
        (a, {"template_key": "welcome", "to": ["u-1"], "idempotency_key": "order-1"}),
        (a, {"template_key": "welcome", "to": ["u-2"], "idempotency_key": "order-2"}),
        (b, {"template_key": "welcome", "to": ["u-1"], "idempotency_key": "order-1"}),
    ]
    batches = held_group(app, monkeypatch, waiting=len(calls) - 1)
    out = run_concurrently(app, calls)
    assert [len(batch) for batch in batches] == [1, 2]  # keyed triggers are grouped too
    assert len({o[0] for o in out}) == 3  # the same key in two organizations: two sends
    monkeypatch.undo()

    # The same key again: the first send request, replayed, nothing written or enqueued.
    enqueued = Queue(HIGH, connection=redis).count
    assert keyed(app, a, "order-1") == (out[0][0], True)
    assert keyed(app, a, "order-1", data={"other": "body"}) == (out[0][0], True)
    assert keyed(app, b, "order-1") == (out[2][0], True)
    assert Queue(HIGH, connection=redis).count == enqueued
    with app.app_context():
        assert db.session.scalar(unscoped(select(func.count()).select_from(SendRequest))) == 3
        db.session.remove()


def test_a_live_key_keeps_none_of_the_profiles_sent_with_it(app, tenants):  # type: ignore[no-untyped-def]
    a, _, _, _ = tenants
    first, _ = keyed(app, a, "signup-9")
    profile = {"external_id": "u-9", "email": "nine@example.com"}
    assert keyed(app, a, "signup-9", to=[profile]) == (first, True)
    with app.app_context(), organization_scope(a):
        assert db.session.scalar(select(Recipient).where(Recipient.external_id == "u-9")) is None
        db.session.remove()


def test_an_expired_key_is_freed_and_makes_a_new_send(app, tenants, redis):  # type: ignore[no-untyped-def]
    a, _, _, _ = tenants
    first, _ = keyed(app, a, "weekly")
    with app.app_context():
        db.session.execute(
            unscoped(
                update(SendRequest)
                .where(SendRequest.id == first)
                .values(created_at=func.now() - timedelta(hours=25))
            )
        )
        db.session.commit()
    second, replayed = keyed(app, a, "weekly")
    assert second != first and not replayed
    assert keyed(app, a, "weekly") == (second, True)
    with app.app_context():
        keys = dict(
            db.session.execute(unscoped(select(SendRequest.id, SendRequest.idempotency_key))).all()
        )
        db.session.remove()
    assert keys == {first: None, second: "weekly"}


def test_a_topic_is_bounded_by_its_own_organizations_newest_recipient(  # type: ignore[no-untyped-def]
    app, tenants, make_org, make_template
):
    a, b, _, ids = tenants
    empty = make_org("Initech")  # no recipients at all, created after both others'
    make_template(empty, "welcome", CONTENT)
    bounds = {}
    for org_id in (a, b, empty.id):
        with organization_scope(org_id):
            db.session.add(Topic(key="digest", name="Digest"))
    db.session.commit()
    for org_id in (a, b, empty.id):
        with app.app_context(), organization_scope(org_id):
            bounds[org_id] = trigger("welcome", topic="digest", actor=ACTOR).max_recipient_id
            db.session.remove()
    assert bounds == {a: ids[a, "u-2"], b: ids[b, "u-1"], empty.id: 0}


def written_together(app: Any, *orgs: int, to: dict[int, list[str]] | None = None) -> list[int]:
    """Write a "welcome" in-app trigger to u-1 (or to ``to[i]`` for the i-th) for each
    organization in one group, as the web process does under load (planning enqueued).
    Returns the send request ids."""
    now = datetime.now(UTC)
    values = {
        "kind": "trigger",
        "audience": None,
        "ids": [],
        "data": {},
        "channels": ["in_app"],
        "idempotency_key": None,
        "send_at": now,
        "local_send_time": None,
        "bounded": False,
        "actor": ACTOR.label,
    }
    with app.app_context():
        outcomes = services._write_group(
            [
                services._Pending(
                    services._statement_row(org, "welcome", (to or {}).get(i, ["u-1"]), values),
                    True,
                )
                for i, org in enumerate(orgs)
            ]
        )
        db.session.remove()
    return [outcome.row[0] for outcome in outcomes]


def work(app: Any, redis: Any) -> None:
    from workers.worker import WhistleSimpleWorker

    with app.app_context():
        WhistleSimpleWorker([Queue(HIGH, connection=redis)], connection=redis).work(burst=True)
        db.session.remove()


def statuses(app: Any) -> dict[int, tuple[int, str, int]]:
    """Each send request's organization, status and notifications (of its organization)."""
    from whistle_web.models import Notification

    with app.app_context():
        rows = db.session.execute(
            unscoped(
                select(
                    SendRequest.id,
                    SendRequest.organization_id,
                    SendRequest.status,
                    select(func.count())
                    .where(
                        Notification.send_request_id == SendRequest.id,
                        Notification.organization_id == SendRequest.organization_id,
                    )
                    .scalar_subquery(),
                )
            )
        ).all()
        db.session.remove()
    return {r[0]: (r[1], str(r[2]), r[3]) for r in rows}


def test_a_groups_triggers_are_planned_by_one_job_each_in_its_organization(app, tenants, redis):  # type: ignore[no-untyped-def]
    from rq.registry import FinishedJobRegistry

    a, b, _, _ = tenants
    first, second, third = written_together(app, a, b, a)
    (job,) = Queue(HIGH, connection=redis).get_jobs()
    assert job.id == f"plan-group-{first}"
    assert job.args == ([(first, a), (second, b), (third, a)],)
    for request_id in (first, second, third):
        assert redis.get(f"whistle:planning:{request_id}") == job.id.encode()
        assert 0 < redis.ttl(f"whistle:planning:{request_id}") <= 24 * 3600
    work(app, redis)
    assert FinishedJobRegistry(HIGH, connection=redis).get_job_ids() == [job.id]
    assert statuses(app) == {
        first: (a, "planned", 1),
        second: (b, "planned", 1),
        third: (a, "planned", 1),
    }


def test_the_sweeper_leaves_a_queued_groups_triggers_to_it(app, tenants, redis):  # type: ignore[no-untyped-def]
    """Under a backlog longer than the sweeper's grace, a trigger waiting in its group's
    job is not enqueued a second time."""
    from whistle_web.deliveries.sweeper import start_due_send_requests

    a, b, _, _ = tenants
    written_together(app, a, b)
    with app.app_context():
        assert start_due_send_requests(datetime.now(UTC) + timedelta(minutes=10)) == 0
        db.session.remove()
    assert len(Queue(HIGH, connection=redis).get_jobs()) == 1


def test_a_trigger_failing_in_a_group_fails_alone_and_the_sweeper_plans_it_again(
    app, tenants, redis, monkeypatch, caplog
):  # type: ignore[no-untyped-def]
    from rq.job import Job
    from rq.registry import FailedJobRegistry

    from whistle_web.deliveries.sweeper import start_due_send_requests
    from workers import sending

    a, b, _, _ = tenants
    first, second = written_together(app, a, b)
    plan = sending.plan_send_request

    def broken(request_id: int, organization_id: int) -> str:
        if request_id == first:
            db.session.execute(select(1 / func.zero()))  # no such function: aborts it
        return plan(request_id, organization_id)

    monkeypatch.setattr(sending, "plan_send_request", broken)
    with caplog.at_level(logging.ERROR):
        work(app, redis)
    monkeypatch.undo()
    assert f"planning send request {first} failed" in caplog.text
    (failed,) = FailedJobRegistry(HIGH, connection=redis).get_job_ids()
    assert failed == f"plan-group-{first}"
    assert f"send requests [{first}] of 2 could not be planned" in (
        Job.fetch(failed, connection=redis).latest_result().exc_string
    )
    # The other was planned after the failure, in a clean transaction.
    assert statuses(app) == {first: (a, "pending", 0), second: (b, "planned", 1)}

    with app.app_context():
        assert start_due_send_requests(datetime.now(UTC) + timedelta(minutes=10)) == 1
        db.session.remove()
    (job,) = Queue(HIGH, connection=redis).get_jobs()
    assert (job.id, tuple(job.args)) == (f"plan-{first}", (first, a))
    work(app, redis)
    assert statuses(app)[first] == (a, "planned", 1)


def test_a_larger_trigger_of_a_group_is_planned_by_a_job_of_its_own(
    app, org, tenants, redis, make_recipient
):  # type: ignore[no-untyped-def]
    """Only triggers small enough to be sent by their planning job share one: the small
    ones would otherwise wait for a larger one's planning."""
    from whistle_web.deliveries.planner import INLINE_RECIPIENTS

    a, b, _, _ = tenants
    many = [f"m-{i}" for i in range(INLINE_RECIPIENTS + 1)]
    for external_id in many:
        make_recipient(org, external_id)
    db.session.commit()
    small, large, other = written_together(app, a, a, b, to={1: many})
    jobs = {job.id: job.args for job in Queue(HIGH, connection=redis).get_jobs()}
    assert jobs == {
        f"plan-{large}": (large, a),
        f"plan-group-{small}": ([(small, a), (other, b)],),
    }
    assert redis.get(f"whistle:planning:{large}") is None
    work(app, redis)
    assert statuses(app) == {
        small: (a, "planned", 1),
        large: (a, "planned", len(many)),
        other: (b, "planned", 1),
    }
    # One small trigger beside a larger one: a job each.
    lone, big = written_together(app, b, a, to={1: many})
    assert {job.id for job in Queue(HIGH, connection=redis).get_jobs()} == {
        f"plan-{lone}",
        f"plan-{big}",
    }
