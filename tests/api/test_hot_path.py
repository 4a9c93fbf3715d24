"""The trigger's hot path: what a request costs in SQL and Redis, and that its shortcuts
(the per-process API key cache, the one-trip rate limit, plain SQL) keep the semantics."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from sqlalchemy import event, func, select, update

from tests.api.conftest import assert_problem
from tests.pipeline.conftest import CONTENT
from whistle_web.accounts import services as accounts
from whistle_web.accounts.models import ApiKey
from whistle_web.api import limiter
from whistle_web.extensions import db
from whistle_web.models import Recipient, SendRequest
from whistle_web.tenancy import organization_scope

BODY = {"template": "welcome", "to": ["u-1"], "channels": ["in_app"], "data": {"a": 1}}


@pytest.fixture(autouse=True)
def _fresh_key_cache():  # type: ignore[no-untyped-def]
    accounts._key_cache.clear()
    yield
    accounts._key_cache.clear()


@pytest.fixture
def welcome(org, make_template):  # type: ignore[no-untyped-def]
    return make_template(org, "welcome", CONTENT)


@pytest.fixture
def ada(org, make_recipient):  # type: ignore[no-untyped-def]
    return make_recipient(org, "u-1", name="Ada")


@contextmanager
def sql_statements():  # type: ignore[no-untyped-def]
    seen: list[str] = []

    def record(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if not statement.lstrip().upper().startswith(("SAVEPOINT", "RELEASE", "ROLLBACK")):
            seen.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


@contextmanager
def autocommit_statements():  # type: ignore[no-untyped-def]
    """Each statement's first word, and whether its connection was in autocommit."""
    seen: list[tuple[str, bool]] = []

    def record(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        seen.append((statement.split()[0], conn.connection.dbapi_connection.autocommit))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


def committed_and_key_cached(api) -> None:  # type: ignore[no-untyped-def]
    """Commit the fixtures' rows and have the API key cached, as in a running process."""
    db.session.commit()
    assert api.post("/notifications", json=BODY).status_code == 202
    db.session.remove()


@contextmanager
def limiter_calls():  # type: ignore[no-untyped-def]
    client = limiter._storage.get_connection()
    calls: list[tuple] = []
    original = client.execute_command

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args)
        return original(*args, **kwargs)

    client.execute_command = counting
    try:
        yield calls
    finally:
        del client.execute_command


def test_a_trigger_is_one_statement_and_one_rate_limit_call(api, welcome, ada, redis):
    assert api.post("/notifications", json=BODY).status_code == 202  # caches the key
    with sql_statements() as statements, limiter_calls() as calls:
        response = api.post("/notifications", json=BODY)
    assert response.status_code == 202, response.json
    # The lookup and the INSERT in one statement (and no pool pre-ping before it).
    assert [s.split()[0] for s in statements] == ["WITH"], statements
    assert len(calls) == 1 and calls[0][0] == "EVALSHA"
    accepted = response.json
    assert accepted["status"] == "pending" and accepted["recipients"] == 1
    assert accepted["template"] == "welcome" and accepted["channels"] == ["in_app"]


def test_the_rate_limit_headers_count_down_in_one_round_trip(app, api, monkeypatch, redis):
    monkeypatch.setitem(app.config, "WHISTLE_API_RATE_LIMIT", "3 per minute")
    with limiter_calls() as calls:
        responses = [api.get("/recipients") for _ in range(4)]
    assert len(calls) == 4  # one script per request, the headers included
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert [r.headers["RateLimit-Remaining"] for r in responses] == ["2", "1", "0", "0"]
    assert all(r.headers["RateLimit-Limit"] == "3" for r in responses)
    resets = {int(r.headers["RateLimit-Reset"]) for r in responses}
    assert len(resets) == 1  # the oldest hit in the window sets the reset for all
    assert 0 < int(responses[3].headers["Retry-After"]) <= 61


def test_a_key_revoked_by_another_process_stops_within_a_second(
    org, api, monkeypatch, welcome, ada
):
    assert api.get("/recipients").status_code == 200
    with organization_scope(org.id):
        # What another process's revocation looks like here: the row changes, this
        # process's cache is not told.
        db.session.execute(update(ApiKey).values(revoked_at=db.func.now()))
    assert api.get("/recipients").status_code == 200  # still cached
    later = accounts.time.monotonic() + accounts.KEY_CACHE_SECONDS + 0.1
    monkeypatch.setattr(accounts.time, "monotonic", lambda: later)
    assert_problem(api.get("/recipients"), 401)
    assert_problem(api.post("/notifications", json=BODY), 401)


def test_an_expired_key_stops_at_once_even_when_cached(org, api, monkeypatch):
    assert api.get("/recipients").status_code == 200
    (digest,) = accounts._key_cache
    loaded, active = accounts._key_cache[digest]
    expired = accounts.replace(active, expires_at=accounts.datetime.now(accounts.UTC))
    accounts._key_cache[digest] = (loaded, expired)
    assert_problem(api.get("/recipients"), 401)


def test_last_used_is_written_once_a_minute_and_kept(org, api):
    with sql_statements() as statements:
        for _ in range(3):
            assert api.get("/recipients").status_code == 200
    touches = [s for s in statements if s.startswith("UPDATE api_keys")]
    assert len(touches) == 1
    db.session.expire_all()
    with organization_scope(org.id):
        assert db.session.scalar(select(ApiKey.last_used_at)) is not None


def test_the_plain_sql_lookup_stays_in_the_organization(
    org, other_org, api, other_api, make_template, make_recipient, welcome, ada
):
    make_template(other_org, "welcome", {"in_app": {"title": "Theirs", "body": "x"}})
    # Their template, but our recipient: not theirs to send to.
    assert_problem(other_api.post("/notifications", json=BODY), 422, "to[0]")
    make_recipient(other_org, "u-1", name="Their Ada")
    theirs = other_api.post("/notifications", json=BODY)
    ours = api.post("/notifications", json=BODY)
    assert theirs.status_code == ours.status_code == 202
    with organization_scope(org.id):
        mine = db.session.get(SendRequest, ours.json["id"])
        assert mine.template_id == welcome.id
        assert mine.audience == {"type": "recipients", "ids": [ada.id]}
        assert db.session.get(SendRequest, theirs.json["id"]) is None
    with organization_scope(other_org.id):
        their = db.session.get(SendRequest, theirs.json["id"])
        assert their.template_id != welcome.id and their.audience["ids"] != [ada.id]


def test_channels_are_checked_against_the_published_version(api, org, make_template, ada):
    make_template(org, "mail-only", {"email": {"subject": "s", "text": "t"}})
    body = {**BODY, "template": "mail-only"}
    assert_problem(api.post("/notifications", json=body), 422, "channels[0]")
    body["channels"] = ["email", "webhook"]
    assert api.post("/notifications", json=body).status_code == 202


def _send_requests(org) -> list[SendRequest]:  # type: ignore[no-untyped-def]
    with organization_scope(org.id):
        return list(db.session.scalars(select(SendRequest).order_by(SendRequest.id)))


@pytest.mark.parametrize(
    ("body", "field", "detail"),
    [
        ({"template": "missing"}, "template", "No template with key 'missing'."),
        ({"template": "draft"}, "template", "Template 'draft' has no published version."),
        (
            {"template": "mail-only", "channels": ["email", "sms"]},
            "channels[1]",
            "The template has no sms content.",
        ),
        (  # the path indexes the list as sent, repeats included
            {"template": "mail-only", "channels": ["email", "email", "sms"]},
            "channels[2]",
            "The template has no sms content.",
        ),
        ({"to": ["u-1", "nobody"]}, "to[1]", "No recipient 'nobody'"),
    ],
)
def test_a_refused_trigger_writes_nothing_and_says_why(
    org, api, welcome, ada, redis, make_template, body, field, detail
):
    from whistle_web.message_templates.models import Template

    make_template(org, "mail-only", {"email": {"subject": "s", "text": "t"}})
    with organization_scope(org.id):
        db.session.add(Template(key="draft", name="Draft"))
        db.session.flush()
    response = api.post("/notifications", json={**BODY, **body})
    assert_problem(response, 422, field)
    assert detail in next(e["message"] for e in response.json["errors"] if e["field"] == field)
    assert _send_requests(org) == []
    assert redis.keys("rq:job:*") == []


def test_a_refusal_keeps_no_recipient_created_from_a_profile(org, api, welcome, redis):
    body = {**BODY, "template": "missing", "to": [{"external_id": "new", "name": "New"}]}
    assert_problem(api.post("/notifications", json=body), 422, "template")
    assert_problem(api.get("/recipients/new"), 404)
    assert _send_requests(org) == []


def test_listed_ids_and_profiles_make_one_sorted_audience(org, api, welcome, ada, redis):
    body = {**BODY, "to": [{"external_id": "u-2", "name": "Grace"}, "u-1", "u-2", "u-1"]}
    response = api.post("/notifications", json=body)
    assert response.status_code == 202, response.json
    assert response.json["recipients"] == 2
    (request,) = _send_requests(org)
    with organization_scope(org.id):
        grace = db.session.scalar(select(Recipient.id).where(Recipient.external_id == "u-2"))
    assert request.audience == {"type": "recipients", "ids": sorted([ada.id, grace])}
    assert request.max_recipient_id is None  # a list needs no bound


def test_a_topic_trigger_is_bounded_by_the_recipients_of_now(
    org, other_org, api, welcome, ada, make_recipient, redis
):
    from whistle_web.audiences.models import Topic

    make_recipient(other_org, "theirs")  # a higher id, in another organization
    with organization_scope(org.id):
        topic = Topic(key="news", name="News")
        db.session.add(topic)
        db.session.flush()
    body = {**BODY, "to": None, "topic": "news"}
    assert api.post("/notifications", json=body).status_code == 202
    (request,) = _send_requests(org)
    assert request.audience == {"type": "topic", "id": topic.id}
    assert request.max_recipient_id == ada.id


def test_the_returned_send_request_is_the_row_as_written(org, welcome, ada):
    from sqlalchemy import inspect, text

    from tests.factories import SYSTEM
    from whistle_web.notifications.services import trigger

    with organization_scope(org.id):
        request = trigger("welcome", to=["u-1"], data={"a": 1}, actor=SYSTEM)
        state = inspect(request)
        assert state.persistent and not state.unloaded  # nothing left to load
        row = db.session.execute(
            text("SELECT * FROM send_requests WHERE id = :id"), {"id": request.id}
        ).one()
    columns = SendRequest.__table__.columns
    written = {c.name: getattr(row, c.name) for c in columns}
    returned = {c.name: getattr(request, c.key) for c in columns}
    assert returned == written


@pytest.mark.committed
def test_outside_a_transaction_the_trigger_commits_by_itself(org, api, welcome, ada, redis):
    """Production's case (the tests' other sessions join an outer transaction): with no
    transaction open, the trigger statement runs in autocommit, no BEGIN or COMMIT."""
    org_id = org.id
    committed_and_key_cached(api)
    with autocommit_statements() as seen:
        response = api.post("/notifications", json=BODY)
        db.session.remove()  # each production request has its own session
        refused = api.post("/notifications", json={**BODY, "to": ["nobody"]})
    assert response.status_code == 202, response.json
    assert_problem(refused, 422, "to[0]")
    assert seen == [("WITH", True), ("WITH", True)]
    db.session.remove()
    with organization_scope(org_id):
        rows = db.session.scalars(select(SendRequest.id).order_by(SendRequest.id)).all()
    assert rows[-1] == response.json["id"] and len(rows) == 2
    with db.engine.connect() as conn:  # the pool's connections are transactional again
        assert conn.connection.dbapi_connection.autocommit is False


@pytest.mark.committed
def test_a_keyed_trigger_is_one_grouped_statement_and_its_send_request_is_the_record(
    org, api, welcome, ada, redis
):
    """With an Idempotency-Key: the trigger statement takes the key and keeps the request's
    fingerprint, and nothing else is written (no API record claimed before and answered
    after). A replay is the trigger statement finding the key taken and one read of the
    send request holding it."""
    from whistle_web.api.models import IdempotencyRecord

    org_id = org.id
    committed_and_key_cached(api)
    headers = {"Idempotency-Key": "order-7"}
    with autocommit_statements() as seen:
        first = api.post("/notifications", json=BODY, headers=headers)
        db.session.remove()
        made = list(seen)
        replay = api.post("/notifications", json=BODY, headers=headers)
        db.session.remove()
    assert first.status_code == 202 and replay.status_code == 202
    assert replay.json == first.json and replay.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert made == [("WITH", True)]
    assert seen[len(made) :] == [("WITH", True), ("SELECT", False)]
    with organization_scope(org_id):
        (request,) = db.session.scalars(
            select(SendRequest).where(SendRequest.idempotency_key == "order-7")
        ).all()
        assert request.id == first.json["id"] and len(request.request_hash or "") == 64
        assert db.session.scalar(select(func.count()).select_from(IdempotencyRecord)) == 0
    db.session.remove()
