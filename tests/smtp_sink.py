"""A real SMTP server (aiosmtpd) that keeps what it receives, for send-path tests.

Run it in-process with :class:`SmtpSink` (a context manager), or as its own process with
``python -m tests.smtp_sink PORT LOGFILE`` (the crash test does), which appends each
received Message-ID to LOGFILE.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from email import message_from_bytes
from email.message import Message as EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler:
    def __init__(self, log_path: Path | None = None, refuse: set[str] | None = None) -> None:
        self.messages: list[EmailMessage] = []
        self.connections = 0
        self.refuse = refuse or set()
        self.log_path = log_path
        self.lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        with self.lock:
            self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        if address in self.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        message = message_from_bytes(envelope.content, policy=default)
        with self.lock:
            self.messages.append(message)
            if self.log_path is not None:
                with self.log_path.open("a") as log:
                    log.write(f"{message['Message-ID']}\n")
        return "250 Message accepted"


class SmtpSink:
    def __init__(self, port: int | None = None, **kwargs: Any) -> None:
        self.port = port or free_port()
        self.handler = _Handler(**kwargs)
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)

    @property
    def messages(self) -> list[EmailMessage]:
        return self.handler.messages

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


if __name__ == "__main__":
    sink = SmtpSink(int(sys.argv[1]), log_path=Path(sys.argv[2]))
    with sink:
        while True:
            time.sleep(3600)
