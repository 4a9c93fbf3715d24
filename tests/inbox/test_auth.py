"""The socket's auth path without a server: one query to open an inbox, one for its state,
and nothing read for a claim that does not verify."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event

from whistle_web.extensions import db
from whistle_web.inbox import services
from whistle_web.preferences.services import InvalidRecipientToken, issue_recipient_token


@contextmanager
def statements() -> Iterator[list[str]]:
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


def test_one_query_opens_an_inbox_and_one_reads_its_state(org, make_recipient):
    org.allowed_origins = ["https://app.example.com"]
    ada = make_recipient(org, "u-1")
    db.session.flush()
    token = issue_recipient_token(org.id, "u-1")[0]
    db.session.expunge_all()  # nothing of the organization left in the session
    with statements() as seen:
        opened = services.open_socket(token)
    assert len(seen) == 1
    assert opened.owner == services.InboxOwner(org.id, ada.id, "u-1")
    assert opened.claims.external_id == "u-1"
    assert opened.allowed_origins == ("https://app.example.com",)
    with statements() as seen:
        assert services.inbox_state(opened.owner) == (0, 0)
    assert len(seen) == 1


def test_a_token_opens_only_a_recipient_of_its_own_organization(org, other_org, make_recipient):
    make_recipient(other_org, "globex-only")
    db.session.flush()
    with pytest.raises(InvalidRecipientToken, match="names no recipient"):
        services.open_socket(issue_recipient_token(org.id, "globex-only")[0])


def _with_claims(token: str, **changes: object) -> str:
    """The token with its payload changed and its old signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    raw = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{raw}.{signature}"


def test_claims_read_before_the_signature_check_are_not_trusted(org, other_org, make_recipient):
    make_recipient(org, "u-1")
    make_recipient(other_org, "u-1")
    db.session.flush()
    # Globex's token, edited to name Acme's recipient: Acme's secret does not verify it.
    forged = _with_claims(issue_recipient_token(other_org.id, "u-1")[0], org=org.id)
    with pytest.raises(InvalidRecipientToken, match="not valid"):
        services.open_socket(forged)
    forged = _with_claims(issue_recipient_token(org.id, "u-1")[0], sub="u-2")
    with pytest.raises(InvalidRecipientToken, match="not valid"):
        services.open_socket(forged)


@pytest.mark.parametrize("token", ["", "x" * 4097, "not.a.jwt", 42])
def test_malformed_tokens_are_refused(token):
    with pytest.raises(InvalidRecipientToken):
        services.open_socket(token)  # type: ignore[arg-type]
