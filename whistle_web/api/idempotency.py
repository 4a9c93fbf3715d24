"""``Idempotency-Key`` on POSTs that create or send.

The first request with a key runs and its response is stored; the same key with the same
method, path and body within 24 hours gets that response again (``Idempotent-Replayed:
true``); the same key with a different request, or while the first is still running, is a
409. Server errors are not stored, so a retry after one runs again.

An endpoint whose own write holds the key (``@endpoint(idempotent="handler")``: a trigger's
send request, unique per key) keeps the request's :func:`fingerprint` with that write
instead, and uses the helpers here to answer a retry; what it refuses writes nothing, so a
retry of a refused request is checked again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Response, request
from sqlalchemy import Executable, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert

from whistle_web.api.models import IdempotencyRecord
from whistle_web.connections import autocommit, can_autocommit
from whistle_web.errors import Conflict, ValidationError
from whistle_web.extensions import db
from whistle_web.tenancy import require_organization_id

WINDOW = timedelta(hours=24)
MAX_KEY_LENGTH = 255


def checked_key(key: str) -> str:
    """The key without surrounding blanks.

    Raises:
        ValidationError: empty, or longer than :data:`MAX_KEY_LENGTH`.
    """
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValidationError.single("Idempotency-Key", f"Use 1 to {MAX_KEY_LENGTH} characters.")
    return key


def fingerprint(body: bytes) -> str:
    """What makes this request the same request: method, path and body (SHA-256, hex)."""
    return hashlib.sha256(
        request.method.encode() + b" " + request.path.encode() + b"\n" + body
    ).hexdigest()


def different_request() -> Conflict:
    return Conflict("This Idempotency-Key was used with a different request.")


def replayed(response: Response) -> Response:
    response.headers["Idempotent-Replayed"] = "true"
    return response


def run(key: str, body: bytes, produce: Callable[[], Response]) -> Response:
    key = checked_key(key)
    org_id = require_organization_id()
    digest = fingerprint(body)
    now = datetime.now(UTC)
    # One statement claims the key: a new record, or an expired one taken over (it frees
    # its key); a live record of the key claims nothing.
    claimed = _atomic(
        insert(IdempotencyRecord)
        .values(organization_id=org_id, key=key, request_hash=digest)
        .on_conflict_do_update(
            constraint="uq_api_idempotency_records_organization_id_key",
            set_={
                "request_hash": digest,
                "status_code": None,
                "response_body": None,
                "response_headers": {},
                "created_at": func.now(),
            },
            where=IdempotencyRecord.created_at < now - WINDOW,
        )
        .returning(IdempotencyRecord.id)
    )
    if claimed is None:
        record = db.session.scalar(select(IdempotencyRecord).where(IdempotencyRecord.key == key))
        if record is None or record.request_hash != digest:
            raise different_request()
        if record.status_code is None:
            raise Conflict("A request with this Idempotency-Key is still in progress.")
        replay = Response(
            record.response_body, status=record.status_code, mimetype="application/json"
        )
        for name, value in (record.response_headers or {}).items():
            replay.headers[name] = value
        return replayed(replay)
    try:
        response = produce()
    except Exception:
        _forget(claimed)
        raise
    if response.status_code >= 500:
        _forget(claimed)
        return response
    headers = {}
    if response.mimetype != "application/json":
        headers["Content-Type"] = response.content_type
    _atomic(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.organization_id == org_id, IdempotencyRecord.id == claimed)
        .values(
            status_code=response.status_code,
            response_body=response.get_data(),
            response_headers=headers,
        )
        .returning(IdempotencyRecord.id)
    )
    return response


def _atomic(statement: Executable) -> Any:
    """Run one statement and commit it; returns the first column of its first row.

    With no transaction open in the session (as after a handler that committed), it runs
    in autocommit on a connection of its own: no BEGIN and COMMIT round trips. The
    statements here name their organization themselves.
    """
    session = db.session()
    if can_autocommit(session):
        with autocommit(db.engine) as conn:
            return conn.execute(statement).scalar()
    value = session.execute(statement).scalar()
    session.commit()
    return value


def _forget(record_id: int) -> None:
    db.session.rollback()
    db.session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.id == record_id))
    db.session.commit()
