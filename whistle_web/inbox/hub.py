"""One Redis pattern subscription per process, fanned out to this process's open sockets.

Every web process runs one hub thread subscribed to ``whistle:inbox:*``. A socket registers
its :class:`Client` under (organization id, recipient id); a message on that recipient's
channel is appended to each of its clients' queues and wakes the socket's own thread, which
does the sending: a slow client only ever delays itself. When the subscription drops
(Redis restarted, network cut) the hub reconnects with backoff and then asks every local
socket to resume from PostgreSQL, so nothing published while it was away is lost.

Only ``threading`` primitives and a ``collections.deque`` are used: under gevent's
monkey-patching the hub thread is a greenlet and redis-py's socket reads yield to the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from typing import Any

import redis

from whistle_web.channels.in_app import CHANNEL_PREFIX

log = logging.getLogger(__name__)

PATTERN = f"{CHANNEL_PREFIX}:*"
# Frames queued for one socket before it is switched to a resume from PostgreSQL instead.
MAX_PENDING = 500
MAX_BACKOFF = 10.0


def client_name() -> str:
    """The hub's name in Redis ``CLIENT LIST`` (one per process)."""
    return f"whistle-inbox-hub-{os.getpid()}"


class Client:
    """One open socket of one recipient, as the hub sees it."""

    def __init__(self, organization_id: int, recipient_id: int, wake: Any) -> None:
        self.key = (organization_id, recipient_id)
        self.pending: deque[str] = deque()
        # The socket thread waits on this (simple-websocket's event, also set on input).
        self.wake = wake
        self.needs_resync = False

    def push(self, text: str) -> None:
        if len(self.pending) >= MAX_PENDING:
            # Too far behind: drop the backlog; the socket resumes from the database.
            self.pending.clear()
            self.needs_resync = True
        else:
            self.pending.append(text)
        self.wake.set()

    def resync(self) -> None:
        self.needs_resync = True
        self.wake.set()


def parse_channel(channel: str) -> tuple[int, int] | None:
    """``whistle:inbox:<org>:<recipient>`` -> (org, recipient); None for anything else."""
    prefix, _, rest = channel.rpartition(":")
    head, _, org = prefix.rpartition(":")
    if head != CHANNEL_PREFIX or not org.isdigit() or not rest.isdigit():
        return None
    return int(org), int(rest)


class Hub:
    """The process's subscription and its registry of local sockets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple[int, int], set[Client]] = {}
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._redis_url = ""
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self.reconnects = 0

    def register(self, client: Client, redis_url: str) -> None:
        with self._lock:
            self._clients.setdefault(client.key, set()).add(client)
            self._ensure_running(redis_url)

    def unregister(self, client: Client) -> None:
        with self._lock:
            clients = self._clients.get(client.key)
            if clients is not None:
                clients.discard(client)
                if not clients:
                    del self._clients[client.key]

    def local_count(self, key: tuple[int, int]) -> int:
        with self._lock:
            return len(self._clients.get(key, ()))

    def wait_subscribed(self, timeout: float) -> bool:
        return self.subscribed.wait(timeout)

    def _ensure_running(self, redis_url: str) -> None:
        # A forked worker inherits the object but not the thread: start one per process.
        alive = self._thread is not None and self._thread.is_alive() and self._pid == os.getpid()
        if alive and redis_url == self._redis_url:
            return
        if alive:
            # Another application (tests) with another Redis: follow the newest one.
            self._stop.set()
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self._redis_url = redis_url
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._run,
            args=(redis_url, self._stop, self.subscribed),
            name="whistle-inbox-hub",
            daemon=True,
        )
        self._thread.start()

    def _run(self, redis_url: str, stop: threading.Event, subscribed: threading.Event) -> None:
        backoff = 0.2
        first = True
        while not stop.is_set():
            pubsub = None
            try:
                connection = redis.Redis.from_url(
                    redis_url, health_check_interval=15, client_name=client_name()
                )
                pubsub = connection.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(PATTERN)
                # psubscribe is lazy: read its confirmation so "subscribed" means subscribed.
                pubsub.get_message(timeout=5.0, ignore_subscribe_messages=False)
                subscribed.set()
                if not first:
                    self.reconnects += 1
                    log.info("inbox hub: resubscribed; local sockets resume from the database")
                    self._resync_all()
                first = False
                backoff = 0.2
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._dispatch(message)
            except (redis.RedisError, OSError) as error:
                subscribed.clear()
                if stop.is_set():
                    break
                log.warning("inbox hub: subscription lost (%s); retrying in %.1fs", error, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except Exception:  # the hub must outlive any one bad message
                log.exception("inbox hub: unexpected error")
                stop.wait(backoff)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(redis.RedisError, OSError):
                        pubsub.close()

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        key = parse_channel(channel or "")
        if key is None:
            return
        with self._lock:
            targets = tuple(self._clients.get(key, ()))
        if not targets:
            return
        data = message.get("data")
        # Forwarded as published (frames are built by the outbox and the in-app provider).
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        for client in targets:
            client.push(text)

    def _resync_all(self) -> None:
        with self._lock:
            clients = [c for group in self._clients.values() for c in group]
        for client in clients:
            client.resync()


hub = Hub()
