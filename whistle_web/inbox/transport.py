"""The WebSocket under ``/ws``: simple-websocket's server with a message size limit that holds.

simple-websocket 1.1 has a ``max_message_size`` of its own, but it does not close reliably:
it wakes the socket's thread (``event.set()``) before it marks the connection closed, so a
thread that looks at ``connected`` right away sees it still open and goes back to sleep
until its next ping, and the client is left waiting for the end of the TCP stream (the
``websockets`` client waits for it with no timeout of its own). It also counts text in
characters, not bytes. Here the limit is counted in bytes over all of a message's frames,
as soon as each piece arrives, and an oversized message is reported to simple-websocket as
a close with 1009: its own close path then answers with that code and reason, marks the
connection closed and only then wakes the socket's thread.

simple-websocket reads a socket in a thread of its own and closes it when it stops. It is
handed a duplicate of the connection's file descriptor instead, so that close only drops
the duplicate: the TCP connection stays ours to end after the closing handshake
(:meth:`InboxServer.hang_up`), without resetting it under a close frame the client has
not read yet.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Generator
from typing import Any

from simple_websocket import Server
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Event, Message
from wsproto.frame_protocol import CloseReason

# What simple-websocket's Server reads the connection from, per WSGI server.
_SOCKET_KEYS = ("werkzeug.socket", "gunicorn.socket")
# How long a closing socket waits for the client to end the TCP connection.
LINGER_SECONDS = 2.0


def message_too_big(limit: int) -> str:
    return f"Messages are at most {limit} bytes."


class LimitedConnection(WSConnection):
    """A server-side wsproto connection that refuses messages over ``max_message_bytes``."""

    def __init__(self, max_message_bytes: int) -> None:
        super().__init__(ConnectionType.SERVER)
        self.max_message_bytes = max_message_bytes
        self.message_bytes = 0

    def events(self) -> Generator[Event, None, None]:
        for event in super().events():
            if isinstance(event, Message):
                data = event.data
                if isinstance(data, str):
                    size = len(data) if data.isascii() else len(data.encode("utf-8"))
                else:
                    size = len(data)
                self.message_bytes += size
                if self.message_bytes > self.max_message_bytes:
                    # As if the client had closed: simple-websocket answers with this code
                    # and reason and stops reading; nothing more of the message is kept.
                    yield CloseConnection(
                        code=CloseReason.MESSAGE_TOO_BIG,
                        reason=message_too_big(self.max_message_bytes),
                    )
                    return
                if event.message_finished:
                    self.message_bytes = 0
            yield event


class InboxServer(Server):
    """A ``simple_websocket.Server`` whose messages are at most ``max_message_bytes``."""

    def __init__(self, environ: dict[str, Any], *, max_message_bytes: int, **options: Any) -> None:
        self.max_message_bytes = max_message_bytes
        self.connection: socket.socket | None = None
        environ = dict(environ)
        duplicate = None
        for key in _SOCKET_KEYS:
            if key in environ:
                self.connection = environ[key]
                environ[key] = duplicate = self.connection.dup()
                break
        try:
            super().__init__(environ, **options)
        except BaseException:
            if duplicate is not None:
                duplicate.close()
            raise

    def handshake(self) -> None:
        # Base.__init__ made a plain WSConnection just before calling this.
        self.ws = LimitedConnection(self.max_message_bytes)
        super().handshake()

    def hang_up(self, timeout: float = LINGER_SECONDS) -> None:
        """End the TCP connection once simple-websocket stopped reading.

        After our close frame, the client's answer and anything it was still sending are
        read and dropped until it hangs up (or ``timeout`` passes): closing a socket with
        unread input resets the connection, and a reset can destroy the close frame before
        the client reads it.
        """
        reader = getattr(self, "thread", None)
        if reader is not None:
            reader.join(timeout=1.0)
        connection = self.connection
        if connection is None:  # a server simple-websocket reads without a duplicate
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            return
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                connection.settimeout(left)
                if not connection.recv(65536):
                    break
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
