"""The operations page: queue health, workers, scheduled items, failed jobs (this
organization's only) with a retry that really re-enqueues, and the audit log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from flask import g, has_app_context
from flask.testing import FlaskClient
from rq import Queue, SimpleWorker, Worker
from rq.registry import FailedJobRegistry
from rq_scheduler import Scheduler
from sqlalchemy import insert

from tests.factories import SYSTEM
from whistle_web.accounts.models import Role
from whistle_web.campaigns.models import AudienceType, Campaign, CampaignStatus
from whistle_web.extensions import db
from whistle_web.organizations.models import ActorType, AuditLog
from whistle_web.organizations.services import record_audit
from whistle_web.tenancy import organization_scope
from workers import monitoring

pytestmark = pytest.mark.usefixtures("redis")


def explode(batch_id: int, organization_id: int) -> None:
    """A job of the send path's shape that fails."""
    raise RuntimeError(f"provider exploded on batch {batch_id}")


@pytest.fixture(autouse=True)
def one_user_per_client(monkeypatch):
    """Requests in one test share ``g`` (one app context): forget the cached user and CSRF
    token so each client acts as itself."""
    original = FlaskClient.open

    def open_(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if has_app_context():
            g.pop("_login_user", None)
            g.pop("csrf_token", None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlaskClient, "open", open_)


def fail_job(redis, job_id: str, batch_id: int, organization_id: int, queue: str = "default"):
    Queue(queue, connection=redis).enqueue(
        explode,
        args=(batch_id, organization_id),
        job_id=job_id,
        description=f"send batch {batch_id}",
    )
    SimpleWorker([Queue(queue, connection=redis)], connection=redis).work(burst=True)
    assert job_id in FailedJobRegistry(queue=Queue(queue, connection=redis)).get_job_ids()


def post(client, path, data=None, **kwargs):
    return client.post(path, data={"csrf_token": client.csrf, **(data or {})}, **kwargs)


@pytest.mark.parametrize("path", ["/operations", "/operations/audit"])
@pytest.mark.parametrize(
    ("role", "status"),
    [(Role.VIEWER, 403), (Role.EDITOR, 403), (Role.ADMIN, 200), (Role.OWNER, 200)],
)
def test_operations_need_admin(login_as, role, status, path):
    assert login_as(role).get(path).status_code == status


def test_anonymous_users_are_sent_to_sign_in(client):
    response = client.get("/operations")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_queues_and_workers_are_shown_and_the_health_fragment_polls(login_as, redis):
    Queue("high", connection=redis).enqueue(explode, args=(1, 1))
    worker = Worker(["high", "default"], connection=redis, name="ops-test-worker")
    worker.register_birth()
    worker.heartbeat()
    try:
        client = login_as(Role.ADMIN)
        page = client.get("/operations").get_data(as_text=True)
        assert "ops-test-worker" in page and "Queue high" in page
        assert 'hx-trigger="every 5s"' in page
        fragment = client.get("/operations", headers={"HX-Request": "true"})
        html = fragment.get_data(as_text=True)
        assert fragment.status_code == 200 and "<html" not in html and 'id="health"' in html
        assert "Failed jobs" not in html
    finally:
        worker.register_death()


def test_failed_jobs_show_their_error_and_only_this_organizations(login_as, org, other_org, redis):
    fail_job(redis, "batch-mine", 7, org.id)
    fail_job(redis, "batch-theirs", 8, other_org.id, queue="high")
    client = login_as(Role.ADMIN)
    page = client.get("/operations").get_data(as_text=True)
    assert "batch-mine" in page and "provider exploded on batch 7" in page
    assert "RuntimeError" in page and "Traceback" in page
    assert "batch-theirs" not in page and "batch 8" not in page
    # Retrying another organization's job is a 404, and it stays failed.
    assert post(client, "/operations/jobs/batch-theirs/retry").status_code == 404
    assert post(client, "/operations/jobs/no-such-job/retry").status_code == 404
    assert post(client, "/operations/jobs/bad%20id!/retry").status_code == 404
    high = Queue("high", connection=redis)
    assert "batch-theirs" in FailedJobRegistry(queue=high).get_job_ids()


def test_retry_really_re_enqueues_the_job(login_as, org, redis):
    fail_job(redis, "batch-retry", 9, org.id)
    client = login_as(Role.ADMIN)
    response = post(client, "/operations/jobs/batch-retry/retry", headers={"HX-Request": "true"})
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and "<html" not in html and "queued again" in html
    queue = Queue("default", connection=redis)
    assert queue.job_ids == ["batch-retry"]
    assert "batch-retry" not in FailedJobRegistry(queue=queue).get_job_ids()
    # A worker really runs it again (and here it fails again, back in the registry).
    SimpleWorker([queue], connection=redis).work(burst=True)
    assert "batch-retry" in FailedJobRegistry(queue=queue).get_job_ids()
    with organization_scope(org.id):
        entry = db.session.query(AuditLog).filter_by(action="job.retried").one()
    assert entry.target_id == "batch-retry"
    # Without htmx: back to the page.
    response = post(client, "/operations/jobs/batch-retry/retry")
    assert response.status_code == 303


def test_retry_needs_admin_and_a_csrf_token(login_as, org, redis):
    fail_job(redis, "batch-guarded", 10, org.id)
    assert post(login_as(Role.EDITOR), "/operations/jobs/batch-guarded/retry").status_code == 403
    admin = login_as(Role.ADMIN)
    assert admin.post("/operations/jobs/batch-guarded/retry").status_code == 303  # CSRF refusal
    queue = Queue("default", connection=redis)
    assert queue.count == 0 and "batch-guarded" in FailedJobRegistry(queue=queue).get_job_ids()


def test_scheduled_items_show_periodic_jobs_and_this_organizations_campaigns(
    login_as, org, other_org, make_template, redis
):
    scheduler = Scheduler(connection=redis)
    scheduler.schedule(
        scheduled_time=datetime.now(UTC) + timedelta(minutes=1),
        func=explode,
        args=(1, org.id),
        interval=60,
        id="whistle-ops-tick",
        queue_name="low",
    )
    scheduler.schedule(
        scheduled_time=datetime.now(UTC), func=explode, args=(1, other_org.id), id="theirs-tick"
    )
    for owner, name in ((org, "Spring sale"), (other_org, "Their launch")):
        template = make_template(owner)
        with organization_scope(owner.id):
            db.session.add(
                Campaign(
                    name=name,
                    status=CampaignStatus.SCHEDULED,
                    template_id=template.id,
                    channels=["email"],
                    audience_type=AudienceType.ALL,
                    send_at=datetime.now(UTC) + timedelta(days=1),
                    next_run_at=datetime.now(UTC) + timedelta(days=1),
                )
            )
            db.session.flush()
    page = login_as(Role.ADMIN).get("/operations").get_data(as_text=True)
    assert "whistle-ops-tick" in page and "60 s" in page
    assert "theirs-tick" not in page
    assert "Spring sale" in page and "Their launch" not in page


def test_jobs_per_second_counts_per_worker(redis):
    def info(name, done):
        return monitoring.WorkerInfo(name, "busy", ["high"], None, None, done, 0, None)

    now = 1_000_000.0
    assert monitoring.jobs_per_second(redis, [info("a", 100), info("b", 50)], now) is None
    rate = monitoring.jobs_per_second(redis, [info("a", 200), info("b", 70)], now + 10)
    assert rate == pytest.approx(12.0)
    # A restarted worker (counter back to 0) and a new one do not make the rate negative.
    rate = monitoring.jobs_per_second(redis, [info("a", 5), info("c", 999)], now + 20)
    assert rate == pytest.approx(0.0)


# --- audit log -------------------------------------------------------------------------------


def add_entries(org, count, *, action="provider.updated", label="alice@acme.io", when=None):
    rows = [
        {
            "organization_id": org.id,
            "actor_type": ActorType.USER,
            "actor_id": None,
            "actor_label": label,
            "action": action,
            "target_type": "provider",
            "target_id": str(i),
            "changes": {"n": i},
            "created_at": (when or datetime.now(UTC)) + timedelta(seconds=i),
        }
        for i in range(count)
    ]
    db.session.execute(insert(AuditLog), rows)
    db.session.flush()


def test_audit_log_pages_with_a_cursor_and_only_this_organization(login_as, org, other_org):
    add_entries(org, 60)
    add_entries(other_org, 3, label="mallory@globex.io")
    client = login_as(Role.ADMIN)
    page = client.get("/operations/audit").get_data(as_text=True)
    assert page.count("<code>provider.updated</code>") == 50
    assert "mallory" not in page
    cursor = page.split("cursor=")[1].split("&")[0].split('"')[0]
    more = client.get(f"/operations/audit?cursor={cursor}", headers={"HX-Request": "true"})
    html = more.get_data(as_text=True)
    assert "<html" not in html
    # 60 entries + the member.added entry of the signed-in admin, 50 on the first page.
    assert html.count("<tr>") == 11 and "audit-more" not in html
    assert client.get("/operations/audit?cursor=garbage").status_code == 200


def test_audit_log_filters(login_as, org):
    add_entries(org, 3, action="api_key.created", label="bob@acme.io")
    add_entries(org, 2, action="provider.deleted", when=datetime(2020, 1, 5, tzinfo=UTC))
    with organization_scope(org.id):
        record_audit(SYSTEM, "topic.created", "topic", 1, {"key": "news"})
        db.session.flush()
    client = login_as(Role.ADMIN)

    def rows(query):
        return client.get(f"/operations/audit?{query}").get_data(as_text=True).count("<tr>") - 1

    assert rows("action=api_key.created") == 3
    assert rows("action=provider.") == 2
    assert rows("actor=BOB") == 3
    assert rows("since=2020-01-01&until=2020-01-05") == 2
    assert "Nothing matches" in client.get("/operations/audit?until=2020-01-04").get_data(
        as_text=True
    )
    bad = client.get("/operations/audit?since=yesterday")
    assert bad.status_code == 422 and "Use a date" in bad.get_data(as_text=True)
    # A LIKE wildcard is taken literally.
    assert "Nothing matches" in client.get("/operations/audit?actor=%25").get_data(as_text=True)
