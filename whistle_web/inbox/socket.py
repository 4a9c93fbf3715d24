"""``/ws``: the in-app widget's WebSocket (the protocol is documented in the README).

Each socket is served by its own thread (a greenlet under gevent), which does all of the
socket's sending: frames from the hub are queued on its :class:`~whistle_web.inbox.hub.Client`
and wake it. Between messages the thread holds no database connection (the session is
removed after each use), so idle sockets cost no pool slots.

The socket is a ``simple_websocket.Server`` (:class:`~whistle_web.inbox.transport.InboxServer`,
which enforces the message size limit); to wait for "a client frame arrived or the hub
queued something" in one call, the loop waits on the server's own ``event`` and reads its
``input_buffer`` (the attributes its ``receive`` uses; simple-websocket 1.x).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import redis
from flask import Blueprint, Response, current_app, request
from simple_websocket import ConnectionClosed
from wsproto.utilities import LocalProtocolError

from whistle_web.errors import DomainError, NotFound
from whistle_web.extensions import db
from whistle_web.inbox import services
from whistle_web.inbox.hub import Client, hub
from whistle_web.inbox.services import InboxOwner
from whistle_web.inbox.transport import InboxServer
from whistle_web.preferences.services import InvalidRecipientToken, RecipientClaims

log = logging.getLogger(__name__)

bp = Blueprint("inbox", __name__)

AUTH_TIMEOUT = 5.0
PING_INTERVAL = 25.0
# A client message, all of its frames together, in bytes (larger ones close with 1009).
MAX_MESSAGE_BYTES = 4096
# Client frames per second per socket, and the burst allowed above it.
RATE_PER_SECOND = 20.0
RATE_BURST = 40.0
# How long a socket's slot in the per-recipient count lives without a refresh (pings).
SLOT_TTL = 3 * PING_INTERVAL
MAX_REF_LENGTH = 64
SUBSCRIBE_WAIT = 2.0

# Close codes (the contract in the README).
CLOSE_AUTH = 4001
CLOSE_ORIGIN = 4003
CLOSE_RATE = 4008
CLOSE_TOO_MANY = 4009
CLOSE_MALFORMED = 4400
CLOSE_SERVER_ERROR = 1011
# A published frame's own seq: the first "seq" key, which precedes any item data.
_SEQ = re.compile(r'"seq":(\d+)')
CLIENT_TYPES = frozenset({"auth", "seen", "read", "read_all", "archive", "clicked", "pong"})


class Close(Exception):
    """End the socket with a close code and a short reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def normalize_origin(value: str) -> str | None:
    """``https://Example.com:443/`` -> ``https://example.com``; None when not an origin."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    suffix = f":{port}" if port is not None and port != default else ""
    return f"{parts.scheme}://{host}{suffix}"


def origin_allowed(origin: str | None, allowed: list[str] | None, base_url: str) -> bool:
    """No Origin header (not a browser) passes; otherwise it must be listed or our own."""
    if origin is None:
        return True
    wanted = normalize_origin(origin)
    if wanted is None:
        return False
    permitted = {normalize_origin(o) for o in (allowed or [])}
    permitted.add(normalize_origin(base_url))
    return wanted in permitted


# Atomically: forget expired slots, refuse when full, else take one (scored by expiry).
_TAKE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class SocketSlots:
    """Open sockets per recipient across every process, counted in a Redis sorted set.

    Each socket holds a member scored by when it expires, refreshed with every ping, so a
    killed process's sockets stop counting on their own. When Redis is unreachable the
    count falls back to this process's sockets.
    """

    def __init__(self, client: redis.Redis, owner: InboxOwner, limit: int) -> None:
        self.redis = client
        self.key = f"whistle:ws:sockets:{owner.organization_id}:{owner.recipient_id}"
        self.local_key = (owner.organization_id, owner.recipient_id)
        self.member = uuid.uuid4().hex
        self.limit = limit

    def take(self) -> bool:
        now = time.time()
        try:
            taken = self.redis.eval(
                _TAKE_SLOT,
                1,
                self.key,
                now,
                self.limit,
                now + SLOT_TTL,
                self.member,
                int(SLOT_TTL * 2),
            )
            return bool(taken)
        except redis.RedisError as error:
            log.warning("ws: socket count unavailable (%s); counting this process only", error)
            return hub.local_count(self.local_key) < self.limit

    def refresh(self) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(self.key, {self.member: time.time() + SLOT_TTL}, xx=True)
            pipe.expire(self.key, int(SLOT_TTL * 2))
            pipe.execute()
        except redis.RedisError:
            pass  # counted locally meanwhile; the slot expires on its own

    def release(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.redis.zrem(self.key, self.member)


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def parse_frame(raw: Any) -> dict[str, Any]:
    """A client frame as a dict with a known ``type``.

    Raises:
        Close: not JSON text, not an object, or an unknown type (4400).
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Close(CLOSE_MALFORMED, "Frames are UTF-8 JSON text.") from None
    try:
        frame = json.loads(raw)
    except (TypeError, ValueError):
        raise Close(CLOSE_MALFORMED, "Frames are JSON objects.") from None
    kind = frame.get("type") if isinstance(frame, dict) else None
    if not isinstance(kind, str) or kind not in CLIENT_TYPES:
        raise Close(CLOSE_MALFORMED, "Unknown frame type.")
    return frame


def _json(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), default=str)


def _read_only_connection() -> None:
    """Put the session on an autocommit connection for the handshake's reads.

    A session already in a transaction (something read before the handshake) cannot
    change its isolation level: it reads in that transaction instead.
    """
    if db.session().in_transaction():
        return
    db.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def _release_db() -> None:
    """Give the connection back to the pool while the socket waits."""
    db.session.remove()


class InboxSocket:
    """One authenticated widget connection."""

    def __init__(self, ws: InboxServer, config: dict[str, Any], redis_client: redis.Redis) -> None:
        self.ws = ws
        self.config = config
        self.redis = redis_client
        self.owner: InboxOwner | None = None
        self.expires_at = 0.0
        self.client: Client | None = None
        self.slots: SocketSlots | None = None
        self.bucket = TokenBucket(RATE_PER_SECOND, RATE_BURST)
        self.last_seq = 0

    # --- lifecycle ------------------------------------------------------------------------

    def serve(self, origin: str | None) -> None:
        try:
            self._authenticate(origin)
            self._run()
        except Close as close:
            self._close(close.code, close.reason)
        except ConnectionClosed:
            pass
        except Exception:  # the database or Redis failed: say so, the widget reconnects
            log.exception("ws: socket failed")
            self._close(CLOSE_SERVER_ERROR, "Server error; reconnect later.")
        finally:
            if self.client is not None:
                hub.unregister(self.client)
            if self.slots is not None:
                self.slots.release()
            _release_db()
            # Servers that keep the connection for HTTP keep-alive afterwards (Werkzeug's)
            # would otherwise leave the client waiting for the end of the stream.
            self.ws.hang_up()

    def _close(self, code: int, reason: str) -> None:
        # LocalProtocolError: simple-websocket's reader closed it a moment ago.
        with contextlib.suppress(ConnectionClosed, LocalProtocolError, OSError):
            self.ws.close(reason=code, message=reason)

    def send(self, frame: dict[str, Any] | str) -> None:
        try:
            self.ws.send(frame if isinstance(frame, str) else _json(frame))
        except LocalProtocolError:
            # The reader closed the connection (a close from the client, an oversized
            # message) between our look at ``connected`` and this send.
            raise ConnectionClosed(self.ws.close_reason, self.ws.close_message) from None

    # --- authentication -------------------------------------------------------------------

    def _authenticate(self, origin: str | None) -> None:
        raw = self.ws.receive(timeout=AUTH_TIMEOUT)
        if raw is None:
            raise Close(CLOSE_AUTH, "Authenticate within 5 seconds.")
        frame = parse_frame(raw)
        if frame["type"] != "auth":
            raise Close(CLOSE_AUTH, "The first frame must be auth with a token.")
        last_seq = frame.get("last_seq")
        if last_seq is not None and (
            not isinstance(last_seq, int) or isinstance(last_seq, bool) or not 0 <= last_seq < 2**63
        ):
            raise Close(CLOSE_MALFORMED, "last_seq is a non-negative integer.")
        # One database connection for the whole handshake (two queries, one more to
        # resume), given back before the socket starts waiting. It only reads: in
        # autocommit, without the round trips of BEGIN and ROLLBACK.
        try:
            _read_only_connection()
            self._open(origin, frame.get("token"), last_seq)
        finally:
            _release_db()

    def _open(self, origin: str | None, token: Any, last_seq: int | None) -> None:
        try:
            opened = services.open_socket(token)
        except InvalidRecipientToken as error:
            raise Close(CLOSE_AUTH, error.detail) from None
        if not origin_allowed(origin, opened.allowed_origins, self.config["WHISTLE_BASE_URL"]):
            raise Close(CLOSE_ORIGIN, "This origin may not open the inbox.")
        owner = self.owner = opened.owner
        self._set_expiry(opened.claims)
        self.slots = SocketSlots(
            self.redis, owner, int(self.config["WHISTLE_WS_MAX_SOCKETS_PER_RECIPIENT"])
        )
        if not self.slots.take():
            self.slots = None
            raise Close(CLOSE_TOO_MANY, "Too many open sockets for this recipient.")
        # Registered before reading the database: nothing published from here on is missed
        # (an item both resumed and pushed arrives twice; clients upsert by id).
        self.client = Client(owner.organization_id, owner.recipient_id, self.ws.event)
        hub.register(self.client, self.config["REDIS_URL"])
        if not hub.subscribed.is_set():  # the process's first socket, or Redis came back
            _release_db()
            if not hub.wait_subscribed(SUBSCRIBE_WAIT):
                log.warning("ws: Redis subscription not ready; live frames may be late")
        self.last_seq, unread = services.inbox_state(owner)
        self.send(
            {
                "type": "ready",
                "seq": self.last_seq,
                "unread_count": unread,
                "recipient": owner.external_id,
                "preferences_url": services.preferences_url(owner),
                "expires_at": opened.claims.expires_at.isoformat(),
            }
        )
        if last_seq is not None:
            # The count just read stays right: a change since then is already queued.
            self._resume(last_seq, unread=unread)

    def _set_expiry(self, claims: RecipientClaims) -> None:
        remaining = (claims.expires_at - datetime.now(UTC)).total_seconds()
        self.expires_at = time.monotonic() + remaining

    def _resume(self, last_seq: int, *, unread: int | None = None) -> None:
        assert self.owner is not None
        frames = services.resume(self.owner, last_seq)
        if frames is None:
            self.send({"type": "reset"})
            self.last_seq, unread = services.inbox_state(self.owner)
        else:
            for frame in frames:
                self.send(frame)
                self.last_seq = max(self.last_seq, frame["seq"] or 0)
        if unread is None:
            unread = services.unread_count(self.owner)
        self.send({"type": "unread_count", "count": unread})

    # --- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        assert self.client is not None
        ws, client = self.ws, self.client
        next_ping = time.monotonic() + PING_INTERVAL
        while True:
            now = time.monotonic()
            if now >= self.expires_at:
                raise Close(CLOSE_AUTH, "The recipient token expired.")
            if now >= next_ping:
                self.send({"type": "ping"})
                if self.slots is not None:
                    self.slots.refresh()
                next_ping = now + PING_INTERVAL
            # Set by simple-websocket when a frame arrives or the peer leaves, and by the hub.
            ws.event.wait(timeout=max(0.0, min(next_ping, self.expires_at) - now))
            ws.event.clear()
            while ws.input_buffer:
                self._handle(ws.input_buffer.pop(0))
            if not ws.connected:
                return
            if client.needs_resync:
                client.needs_resync = False
                client.pending.clear()
                try:
                    self._resume(self.last_seq)
                finally:
                    _release_db()
            while client.pending:
                text = client.pending.popleft()
                self.send(text)
                found = _SEQ.search(text)
                if found:
                    self.last_seq = max(self.last_seq, int(found.group(1)))

    def _handle(self, raw: Any) -> None:
        if not self.bucket.take():
            raise Close(CLOSE_RATE, "Too many messages; slow down.")
        frame = parse_frame(raw)
        kind = frame["type"]
        if kind == "pong":
            return
        ref = frame.get("ref")
        if ref is not None and not (
            (isinstance(ref, str) and len(ref) <= MAX_REF_LENGTH)
            or (isinstance(ref, int) and not isinstance(ref, bool) and abs(ref) < 2**53)
        ):
            self.send(_error(None, "invalid", "ref is a short string or an integer."))
            return
        try:
            self._act(kind, frame)
            self.send({"type": "ack", "ref": ref})
        except NotFound as error:
            self.send(_error(ref, "not_found", error.detail))
        except DomainError as error:
            self.send(_error(ref, "invalid", error.detail))
        except Close:
            raise
        except Exception:  # one failed action must not take the socket down
            log.exception("ws: action %s failed", kind)
            db.session.rollback()
            self.send(_error(ref, "internal", "The action failed; try again."))
        finally:
            _release_db()

    def _act(self, kind: str, frame: dict[str, Any]) -> None:
        owner = self.owner
        assert owner is not None
        if kind == "auth":
            self._reauthenticate(frame)
        elif kind == "read_all":
            services.read_all(owner)
        elif kind == "seen":
            services.act(owner, "seen", services.check_ids(frame.get("ids")))
        else:
            ids = services.check_ids(frame.get("id"), field="id", many=False)
            services.act(owner, kind, ids)

    def _reauthenticate(self, frame: dict[str, Any]) -> None:
        """A fresh token for the same recipient extends the socket's life."""
        assert self.owner is not None
        try:
            owner, claims = services.authenticate(frame.get("token"))  # type: ignore[arg-type]
        except InvalidRecipientToken as error:
            raise Close(CLOSE_AUTH, error.detail) from None
        if owner != self.owner:
            raise Close(CLOSE_AUTH, "A socket serves one recipient; reconnect to switch.")
        self._set_expiry(claims)


def _error(ref: Any, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "ref": ref, "code": code, "message": message}


@bp.before_request
def _no_compression() -> None:
    """Serve /ws without permessage-deflate.

    simple-websocket accepts the extension whenever the client offers it (browsers always
    do), and then every socket keeps a zlib compressor and decompressor: most of a socket's
    memory (measured with bench/realtime.py: about 150 KiB a socket with it, see the README),
    to shrink frames of a few hundred bytes. Hiding the offer from the handshake keeps
    frames uncompressed.
    """
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


class _Handled(Response):
    """The response after a WebSocket: nothing more goes out on its connection."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def __call__(self, environ: Any, start_response: Any) -> Any:
        if self.mode == "gunicorn":
            # gunicorn's workers take this as "the application kept the connection".
            raise StopIteration()
        return super().__call__(environ, start_response)


@bp.route("/ws", websocket=True)
def inbox_socket() -> Response:
    """Serve the widget's socket (what flask-sock's route does, with :class:`InboxServer`)."""
    from whistle_web import get_redis

    origin = request.headers.get("Origin")
    ws = InboxServer(request.environ, max_message_bytes=MAX_MESSAGE_BYTES)
    InboxSocket(ws, current_app.config, get_redis()).serve(origin)
    return _Handled(ws.mode)
