"""Sentry reporting: Flask and RQ errors reach the DSN, and no secret travels with them.

A local HTTP server plays Sentry's ingest endpoint; the app is built by ``create_app`` with
``SENTRY_DSN`` pointing at it, so ``_init_sentry`` and the real SDK transport are used.
The SDK is process-global: the fixture puts back the previous client (and the credentials
keyring ``create_app`` replaces), so other tests never report anywhere.
"""

from __future__ import annotations

import gzip
import json
import secrets
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from rq import Queue, SimpleWorker
from rq.registry import FailedJobRegistry
from sentry_sdk.utils import SENSITIVE_DATA_SUBSTITUTE

from tests.channels.http_server import RecordingServer
from tests.factories import SYSTEM
from whistle_web import create_app, crypto
from whistle_web.channels.kinds import Channel, ProviderKind
from whistle_web.extensions import db
from whistle_web.models import Provider
from whistle_web.notifications.services import trigger
from whistle_web.tenancy import organization_scope
from workers.queues import QUEUES

SECRET_KEY = "sentry-test-secret-" + secrets.token_hex(16)
API_KEY = "whk_0123456789_" + secrets.token_urlsafe(24)
QUEUE = "sentry-test"


class ViewExploded(RuntimeError):
    pass


class JobExploded(RuntimeError):
    pass


def exploding_job(order_id: int) -> None:
    """An RQ job (imported by the worker as tests.test_sentry.exploding_job)."""
    raise JobExploded(f"order {order_id} could not be processed")


# --- a Sentry ingest endpoint on 127.0.0.1 ----------------------------------------------------


def _decoded(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "br":
        import brotli  # type: ignore[import-not-found]

        return brotli.decompress(body)
    assert encoding in ("", "identity"), encoding
    return body


def envelope_items(body: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """(item header, payload) of every item of a Sentry envelope."""
    _header, _, rest = body.partition(b"\n")
    items = []
    while rest.strip():
        line, _, rest = rest.partition(b"\n")
        if not line.strip():
            continue
        header = json.loads(line)
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"] :]
            rest = rest.removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append((header, payload))
    return items


class SentryIngest:
    def __init__(self, server: RecordingServer) -> None:
        self.server = server

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.server.port}/1"

    def bodies(self) -> list[bytes]:
        """Every request body received, decompressed."""
        return [
            _decoded(r.body, r.headers.get("content-encoding", "").lower())
            for r in self.server.requests
        ]

    def events(self) -> list[dict[str, Any]]:
        sentry_sdk.flush(timeout=5)
        events = []
        for request, body in zip(self.server.requests, self.bodies(), strict=True):
            assert request.path == "/api/1/envelope/", request.path
            assert "sentry_key=public" in request.headers.get("x-sentry-auth", "")
            events += [json.loads(p) for h, p in envelope_items(body) if h.get("type") == "event"]
        return events


def exception_types(event: dict[str, Any]) -> list[str]:
    return [value["type"] for value in event["exception"]["values"]]


@pytest.fixture
def ingest() -> Iterator[SentryIngest]:
    with RecordingServer() as server:
        yield SentryIngest(server)


@pytest.fixture
def sentry_app(app, service_urls, ingest, monkeypatch):  # type: ignore[no-untyped-def]
    """An app with SENTRY_DSN set; afterwards Sentry is back to what it was."""
    monkeypatch.delenv("SENTRY_DSN", raising=False)
    # create_app() reconfigures the process-wide credentials keyring: restore it afterwards.
    monkeypatch.setattr(crypto, "_keyring", crypto._keyring)
    previous = sentry_sdk.get_global_scope().client
    assert not previous.is_active(), "another test left Sentry initialised"
    _database_url, redis_url = service_urls
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sentry_app = create_app(
            {
                "WHISTLE_ENV": "test",
                "TESTING": True,
                # A real 500 answer rather than the exception re-raised into the test client.
                "PROPAGATE_EXCEPTIONS": False,
                "SQLALCHEMY_DATABASE_URI": app.config["SQLALCHEMY_DATABASE_URI"],
                "REDIS_URL": redis_url,
                "WHISTLE_FAST_PASSWORD_HASH": True,
                "SERVER_NAME": "whistle.test",
                "SECRET_KEY": SECRET_KEY,
                "SENTRY_DSN": ingest.dsn,
            }
        )
    # Checked by test_sentry_is_configured_without_deprecated_options (the suite turns
    # warnings into errors, which would otherwise stop every test here at create_app).
    sentry_app.extensions["tests.init_warnings"] = caught
    client = sentry_sdk.get_client()
    try:
        assert client.is_active() and client.dsn == ingest.dsn
        assert not client.options.get("send_default_pii")  # the default: no PII
        yield sentry_app
    finally:
        client.flush(timeout=5)
        client.close()
        sentry_sdk.get_global_scope().set_client(previous)
        with sentry_app.app_context():
            db.engine.dispose()
    assert not sentry_sdk.get_client().is_active()


def assert_no_secrets(ingest: SentryIngest) -> None:
    bodies = ingest.bodies()
    assert bodies, "nothing reached the Sentry endpoint"
    for body in bodies:
        text = body.decode("utf-8", "replace")
        assert SECRET_KEY not in text, "SECRET_KEY sent to Sentry"
        assert API_KEY not in text, "an API key sent to Sentry"


def test_sentry_is_configured_without_deprecated_options(sentry_app):
    deprecations = [
        str(w.message)
        for w in sentry_app.extensions["tests.init_warnings"]
        if issubclass(w.category, DeprecationWarning) and "sentry" in w.filename
    ]
    assert deprecations == []


# --- Flask ------------------------------------------------------------------------------------


def test_an_unhandled_view_error_is_reported_without_credentials(sentry_app, ingest):
    def explode() -> str:
        raise ViewExploded("the view failed")

    sentry_app.add_url_rule("/sentry-test/explode", "sentry_explode", explode)
    response = sentry_app.test_client().get(
        "/sentry-test/explode?page=2",
        headers={
            "Authorization": f"Bearer {API_KEY}",
            "X-Api-Key": API_KEY,
            "Cookie": f"session={API_KEY}",
        },
    )
    assert response.status_code == 500

    (event,) = ingest.events()
    assert exception_types(event) == ["ViewExploded"]
    assert event["exception"]["values"][0]["value"] == "the view failed"
    mechanism = event["exception"]["values"][0]["mechanism"]
    assert mechanism["type"] == "flask" and mechanism["handled"] is False
    assert event["environment"] == "test"
    assert event["request"]["url"].endswith("/sentry-test/explode")
    assert event["request"]["method"] == "GET"
    assert event["transaction"] == "sentry_explode"
    headers = {k.lower(): v for k, v in event["request"]["headers"].items()}
    assert API_KEY not in json.dumps(headers)
    assert "cookie" not in headers or API_KEY not in str(headers["cookie"])
    assert "user" not in event or "ip_address" not in event["user"]
    assert_no_secrets(ingest)


# --- RQ ---------------------------------------------------------------------------------------


def run_worker(redis: Any, queues: list[str]) -> None:
    SimpleWorker(queues, connection=redis).work(burst=True)


def test_a_failing_rq_job_is_reported_by_the_rq_integration(sentry_app, ingest, redis):
    job = Queue(QUEUE, connection=redis).enqueue(exploding_job, 42, job_id="sentry-test-job")
    with sentry_app.app_context():
        run_worker(redis, [QUEUE])
    assert FailedJobRegistry(QUEUE, connection=redis).get_job_ids() == [job.id]

    (event,) = ingest.events()
    assert exception_types(event) == ["JobExploded"]
    assert event["exception"]["values"][0]["value"] == "order 42 could not be processed"
    assert event["exception"]["values"][0]["mechanism"]["type"] == "rq"
    rq_job = event["extra"]["rq-job"]
    assert rq_job["job_id"] == "sentry-test-job"
    assert rq_job["func"] == "tests.test_sentry.exploding_job"
    assert rq_job["args"] == SENSITIVE_DATA_SUBSTITUTE  # job arguments count as PII
    assert event["transaction"] == "tests.test_sentry.exploding_job"
    assert_no_secrets(ingest)


def crash_a_channel_job(
    sentry_app: Any,
    ingest: SentryIngest,
    redis: Any,
    org: Any,
    make_template: Any,
    make_recipient: Any,
) -> dict[str, Any]:
    """A send job dies inside the channel worker, with its context in the stack's locals.

    The provider's credentials were sealed under a master key that has since been removed
    (a botched key rotation), so decrypting them raises inside ``dispatch._send``.
    Returns the one event Sentry received.
    """
    make_template(org, "hello", {"email": {"subject": "Hi", "text": "Hello"}})
    make_recipient(org, "ann", email="ann@example.com")
    current = crypto._keyring
    crypto.configure(crypto.keyring_from_config("a-master-key-that-was-rotated-out", ""))
    try:
        with organization_scope(org.id):
            provider = Provider(
                channel=Channel.EMAIL,
                kind=ProviderKind.SMTP,
                name="SMTP",
                settings={"host": "127.0.0.1", "port": 2525, "from_email": "hi@acme.example.com"},
            )
            provider.set_credentials({"username": "mailer", "password": "smtp-password-123"})
            db.session.add(provider)
            db.session.flush()
    finally:
        crypto.configure(current)
    with organization_scope(org.id):
        trigger("hello", to=["ann"], channels=["email"], actor=SYSTEM)
    with sentry_app.app_context():  # the worker runs under the app that set Sentry up
        run_worker(redis, list(QUEUES))
    assert sum(FailedJobRegistry(q, connection=redis).count for q in QUEUES) == 1
    (event,) = ingest.events()
    return event


def test_a_crashing_channel_job_is_reported(
    sentry_app, ingest, redis, org, make_template, make_recipient
):
    event = crash_a_channel_job(sentry_app, ingest, redis, org, make_template, make_recipient)
    assert exception_types(event)[-1] == "DecryptionError"
    assert event["exception"]["values"][-1]["mechanism"]["type"] == "rq"
    # A one-recipient trigger is sent by its planning job (planner.plan's run_inline).
    assert event["extra"]["rq-job"]["func"] == "workers.sending.plan_send_request"
    frames = event["exception"]["values"][-1]["stacktrace"]["frames"]
    assert any(f["function"] == "_send" and f["module"].endswith("dispatch") for f in frames)


def test_a_crashing_channel_job_does_not_send_the_secret_key(
    sentry_app, ingest, redis, org, make_template, make_recipient
):
    crash_a_channel_job(sentry_app, ingest, redis, org, make_template, make_recipient)
    assert_no_secrets(ingest)
