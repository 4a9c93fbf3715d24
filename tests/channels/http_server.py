"""A local HTTP server for provider tests: it records every request and answers from a script.

Usage::

    with RecordingServer() as server:
        server.respond_with(201, json={"sid": "SM1"})          # the next request gets this
        ...point the client under test at server.url (http://127.0.0.1:<port>)...
        request = server.requests[0]
        assert request.method == "POST" and request.path == "/2010-04-01/..."
        assert request.headers["authorization"].startswith("Basic ")   # case-insensitive
        assert request.form()["To"] == "+15005550006"                 # or request.json()

Each request is answered by, in this order:

1. the next reply queued with :meth:`RecordingServer.respond_with` (one reply per request);
2. else the handler set with :meth:`RecordingServer.set_handler` (a callable taking the
   :class:`RecordedRequest` and returning a :class:`Reply`);
3. else :attr:`RecordingServer.default` (``Reply(200, json={})`` unless changed).

A reply may carry a ``delay`` (seconds before answering) to provoke client timeouts; closing
the server cuts delays short. The server speaks HTTP/1.1 with keep-alive, so
``RecordedRequest.client_address`` shows whether a client reused one connection.
``close()`` stops the server, cuts open keep-alive connections and joins every handler thread,
so tests leave no sockets or threads behind.

In a test module, ``server = recording_server_fixture()`` defines a ``server`` fixture.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest


@dataclass(frozen=True)
class Reply:
    """What the server answers: ``body`` (raw) wins over ``json``; neither means empty."""

    status: int = 200
    json: Any = None
    headers: Mapping[str, str] | None = None
    delay: float = 0.0
    body: bytes | str | None = None

    def encode(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers or {})
        if self.body is not None:
            data = self.body.encode() if isinstance(self.body, str) else self.body
        elif self.json is not None:
            data = jsonlib.dumps(self.json).encode()
            if not any(name.lower() == "content-type" for name in headers):
                headers["Content-Type"] = "application/json"
        else:
            data = b""
        return data, headers


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    # The request target as sent: path plus query string.
    target: str
    # Case-insensitive: request.headers["content-type"] == request.headers["Content-Type"].
    headers: httpx.Headers
    body: bytes
    # (host, port) of the client side of the connection; one port per reused connection.
    client_address: tuple[str, int]

    @property
    def path(self) -> str:
        """The path without the query string."""
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query, keep_blank_values=True))

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    def form(self) -> dict[str, str]:
        """An ``application/x-www-form-urlencoded`` body; a repeated field keeps its last value."""
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True, strict_parsing=False))

    def form_lists(self) -> dict[str, list[str]]:
        return parse_qs(self.body.decode(), keep_blank_values=True)


Handler = Callable[[RecordedRequest], Reply]


class RecordingServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) that records and answers requests."""

    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply(200, json={})
        self.requests: list[RecordedRequest] = []
        # Exceptions raised by a handler (the client got a 500); tests may assert it is empty.
        self.errors: list[BaseException] = []
        self._queue: deque[Reply] = deque()
        self._handler: Handler | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- scripting ---------------------------------------------------------------------------

    def respond_with(
        self,
        status: int = 200,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
        body: bytes | str | None = None,
        *,
        times: int = 1,
    ) -> RecordingServer:
        """Queue a reply for the next request (``times`` requests); returns the server."""
        reply = Reply(status, json=json, headers=headers, delay=delay, body=body)
        with self._lock:
            self._queue.extend([reply] * times)
        return self

    def set_handler(self, handler: Handler | None) -> RecordingServer:
        """Answer requests (once the queue is empty) with ``handler(request) -> Reply``."""
        self._handler = handler
        return self

    def clear(self) -> None:
        """Forget recorded requests, queued replies and errors."""
        with self._lock:
            self.requests.clear()
            self.errors.clear()
            self._queue.clear()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start() the server first"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RecordingServer:
        self._httpd = _Server(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"RecordingServer:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._httpd is None:
            return
        self._closing.set()
        self._httpd.shutdown()  # stop accepting
        self._httpd.cut_connections()  # wake handler threads idle on keep-alive connections
        self._httpd.server_close()  # close the listening socket, join handler threads
        assert self._thread is not None
        self._thread.join()
        self._httpd = None

    def __enter__(self) -> RecordingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- used by the handler thread ----------------------------------------------------------

    def _answer(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            queued = self._queue.popleft() if self._queue else None
        if queued is not None:
            return queued
        if self._handler is not None:
            try:
                return self._handler(request)
            except Exception as exc:
                self.errors.append(exc)
                return Reply(500, body=f"handler raised {exc!r}")
        return self.default

    def _sleep(self, seconds: float) -> bool:
        """Wait; False when the server closed meanwhile."""
        return not self._closing.wait(seconds)


class _Server(ThreadingHTTPServer):
    # Non-daemon handler threads, so server_close() joins them (no thread outlives a test).
    daemon_threads = False
    block_on_close = True

    def __init__(self, owner: RecordingServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is expected in these tests; stay quiet.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    # An idle keep-alive connection is dropped after this long even if nobody closes it.
    timeout = 10

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        owner = self.server.owner
        request = RecordedRequest(
            method=self.command,
            target=self.path,
            headers=httpx.Headers(list(self.headers.items())),
            body=self._read_body(),
            client_address=tuple(self.client_address[:2]),  # type: ignore[arg-type]
        )
        reply = owner._answer(request)
        if reply.delay and not owner._sleep(reply.delay):
            self.close_connection = True
            return
        data, headers = reply.encode()
        try:
            self.send_response(reply.status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client gave up (timeout) and closed the connection
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


def unused_port() -> int:
    """A port on 127.0.0.1 nobody listens on (connecting to it is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recording_server_fixture(name: str = "server", scope: str = "function") -> Any:
    """A pytest fixture yielding a started :class:`RecordingServer`, closed afterwards.

    In a test module: ``server = recording_server_fixture()``, then take ``server`` as an
    argument. With ``scope="module"``, call ``server.clear()`` between tests.
    """

    @pytest.fixture(name=name, scope=scope)  # type: ignore[call-overload]
    def _recording_server() -> Iterator[RecordingServer]:
        with RecordingServer() as server:
            yield server

    return _recording_server
