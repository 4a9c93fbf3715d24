"""Pooled PostgreSQL connections: checked at checkout without a round trip.

SQLAlchemy's ``pool_pre_ping`` sends ``SELECT 1`` on every checkout: on the API's hot path
that is one round trip in four. A connection that the server (or a proxy between) has
closed, restarted or terminated has something to read on its socket while it sits idle in
the pool: the server's error message, then end-of-file. A healthy idle connection has
nothing, since nobody ``LISTEN``s on a pooled connection. So the checkout asks the kernel,
with a zero-timeout ``poll``, whether the socket is readable, and hands anything readable
back to the pool to be replaced (redis-py checks its pooled connections the same way).
What this cannot see, a peer that vanished without closing (a cut cable), ``SELECT 1``
would only see after the TCP timeout as well.
"""

from __future__ import annotations

import select
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session

_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL
_poll: Callable[[], Any] | None = None


def _kernel_poll() -> Callable[[], Any]:
    """``select.poll`` as the kernel has it: gevent's patched one would yield to the hub."""
    global _poll
    if _poll is None:
        monkey = sys.modules.get("gevent.monkey")
        _poll = monkey.get_original("select", "poll") if monkey is not None else select.poll
    return _poll


def readable_while_idle(fileno: int) -> bool:
    """Whether an idle connection's socket has input waiting (or is closed or broken)."""
    poller = _kernel_poll()()
    poller.register(fileno, _EVENTS)
    return bool(poller.poll(0))


def check_on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Refuse a pooled connection the server has closed: the pool then opens a new one.

    Raises:
        DisconnectionError: the connection is closed, broken or has unexpected input.
    """
    if dbapi_connection.closed or readable_while_idle(dbapi_connection.fileno()):
        raise DisconnectionError("the server closed this pooled connection")


def watch(engine: Engine) -> None:
    """Check the engine's connections at every checkout (instead of ``pool_pre_ping``)."""
    if not event.contains(engine, "checkout", check_on_checkout):
        event.listen(engine, "checkout", check_on_checkout)


def can_autocommit(session: Session) -> bool:
    """Whether a statement that is atomic by itself may run outside ``session``, on a
    connection in autocommit (no BEGIN and COMMIT round trips): only when the session is
    bound to an engine (not into an outer transaction, as the tests' sessions are) and has
    no work its commit would carry: no connection taken in its transaction, nothing to
    flush. (Adding an object begins a session transaction without touching the database.)
    """
    if not isinstance(session.get_bind(), Engine):
        return False
    transaction = session.get_transaction()
    if transaction is None:
        return True
    return not (transaction._connections or session.new or session.dirty or session.deleted)


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """A pooled connection of ``engine`` in autocommit, transactional again once returned.

    Plain statements run here are not seen by the tenancy session event: they bind the
    organization themselves.
    """
    with engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")
