"""The SMTP provider against a real aiosmtpd server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from whistle_web.channels.base import Message, ProviderUnavailable, provider_class
from whistle_web.channels.kinds import Channel
from whistle_web.channels.smtp import SmtpProvider, tls_mode

SENDER = "alerts@whistle.example"
USERNAME, PASSWORD = "mailer", "s3cret-pass-123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Received:
    peer: tuple[str, int]
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


@dataclass
class Recorder:
    """An aiosmtpd handler that keeps what arrives and refuses some recipients.

    ``reject*@`` → 550, ``busy*@`` → 451, ``closing*@`` → 421 the first time only,
    ``slow*@`` → DATA answered after a delay.
    """

    slow_seconds: float = 2.0
    peers: list[tuple[str, int]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    closed_once: set[str] = field(default_factory=set)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        session.host_name = hostname
        if session.peer not in self.peers:  # a peer address is one TCP connection
            self.peers.append(session.peer)
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        local = address.partition("@")[0]
        if local.startswith("reject"):
            return "550 5.1.1 No such user here"
        if local.startswith("busy"):
            return "451 4.7.1 Greylisted, try again later"
        if local.startswith("closing") and address not in self.closed_once:
            self.closed_once.add(address)
            return "421 4.3.2 Service shutting down, closing channel"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        if any(r.startswith("slow") for r in envelope.rcpt_tos):
            await asyncio.sleep(self.slow_seconds)
        message = message_from_bytes(envelope.content, policy=policy.default)
        self.received.append(
            Received(session.peer, envelope.mail_from, list(envelope.rcpt_tos), message)
        )
        return "250 2.0.0 Message accepted for delivery"


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def start_server(recorder: Recorder, **kwargs: Any) -> Controller:
    controller = Controller(recorder, hostname="127.0.0.1", port=free_port(), **kwargs)
    controller.start()
    return controller


@pytest.fixture
def server(recorder: Recorder) -> Iterator[Controller]:
    controller = start_server(recorder)
    yield controller
    controller.stop()


def make_provider(port: int | str | None, **settings: Any) -> SmtpProvider:
    credentials = settings.pop("credentials", {})
    base = {
        "host": "127.0.0.1",
        "port": port,
        "use_tls": False,
        "from_email": SENDER,
        "from_name": "Whistle Alerts",
        "timeout": 5,
    }
    return SmtpProvider({**base, **settings}, credentials)


def email(delivery_id: int, to: str, **headers: str) -> Message:
    return Message(
        delivery_id=delivery_id,
        channel=Channel.EMAIL,
        to=to,
        content={
            "subject": f"Order {delivery_id} shipped",
            "text": f"Your order {delivery_id} is on its way.",
            "html": f"<p>Your order <b>{delivery_id}</b> is on its way.</p>",
        },
        headers=headers,
    )


UNSUBSCRIBE = {
    "List-Unsubscribe": "<https://whistle.example/u/abc123>",
    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
}


def test_registered_for_its_kind():
    assert provider_class("smtp") is SmtpProvider


def test_batch_goes_over_one_connection(server: Controller, recorder: Recorder):
    messages = [
        email(1, "ada@example.com", **UNSUBSCRIBE),
        email(2, "grace@example.com", **{"Message-ID": "<fixed-2@whistle.example>"}),
        email(3, "linus@example.com"),
    ]
    with make_provider(server.port) as provider:
        results = provider.send_batch(messages)
        # A second batch on the same provider object reuses the session too.
        more = provider.send_batch([email(4, "barbara@example.com")])

    assert [r.ok for r in results + more] == [True, True, True, True]
    assert [r.delivery_id for r in results] == [1, 2, 3]
    assert len(recorder.peers) == 1
    assert [r.rcpt_tos for r in recorder.received] == [
        ["ada@example.com"],
        ["grace@example.com"],
        ["linus@example.com"],
        ["barbara@example.com"],
    ]
    assert {r.mail_from for r in recorder.received} == {SENDER}

    first = recorder.received[0].message
    assert first.get_content_type() == "multipart/alternative"
    parts = {part.get_content_type(): part.get_content() for part in first.iter_parts()}
    assert parts["text/plain"].strip() == "Your order 1 is on its way."
    assert parts["text/html"].strip() == "<p>Your order <b>1</b> is on its way.</p>"
    assert first["Subject"] == "Order 1 shipped"
    assert first["To"] == "ada@example.com"
    assert first["From"].addresses[0].display_name == "Whistle Alerts"
    assert first["From"].addresses[0].addr_spec == SENDER
    assert first["List-Unsubscribe"] == "<https://whistle.example/u/abc123>"
    assert first["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert first["Date"]

    # The Message-ID on the wire is the provider message id (generated or given).
    for result, received in zip(results, recorder.received, strict=False):
        assert received.message["Message-ID"] == f"<{result.provider_message_id}>"
    assert results[0].provider_message_id.endswith("@whistle.example")
    assert results[1].provider_message_id == "fixed-2@whistle.example"
    assert len({r.provider_message_id for r in results}) == 3


def test_single_part_bodies(server: Controller, recorder: Recorder):
    html_only = Message(1, Channel.EMAIL, "a@example.com", {"subject": "Hi", "html": "<p>x</p>"})
    text_only = Message(2, Channel.EMAIL, "b@example.com", {"subject": "Hi", "text": "plain"})
    with make_provider(server.port) as provider:
        assert all(r.ok for r in provider.send_batch([html_only, text_only]))
    html_message, text_message = (r.message for r in recorder.received)
    assert html_message.get_content_type() == "text/html"
    assert html_message.get_content().strip() == "<p>x</p>"
    assert text_message.get_content_type() == "text/plain"
    assert text_message.get_content().strip() == "plain"


def test_refused_recipient_is_permanent_and_the_rest_are_sent(
    server: Controller, recorder: Recorder
):
    messages = [
        email(1, "ada@example.com"),
        email(2, "rejected@example.com"),
        email(3, "busy@example.com"),
        email(4, "linus@example.com"),
    ]
    with make_provider(server.port) as provider:
        ok, rejected, busy, last = provider.send_batch(messages)

    assert ok.ok and last.ok
    assert not rejected.ok and not rejected.transient
    assert "550" in rejected.error
    assert not busy.ok and busy.transient
    assert "451" in busy.error
    assert [r.rcpt_tos for r in recorder.received] == [["ada@example.com"], ["linus@example.com"]]
    assert len(recorder.peers) == 1  # a refused recipient does not cost the connection


def test_header_injection_is_refused_and_subject_flattened(server: Controller, recorder: Recorder):
    evil = email(1, "ada@example.com", **{"X-Campaign": "spring\r\nBcc: victim@example.com"})
    multiline = Message(
        2, Channel.EMAIL, "grace@example.com", {"subject": "Line one\nline two", "text": "x"}
    )
    with make_provider(server.port) as provider:
        bad, good = provider.send_batch([evil, multiline])
    assert not bad.ok and not bad.transient
    assert "bad message" in bad.error
    assert good.ok
    assert [r.rcpt_tos for r in recorder.received] == [["grace@example.com"]]
    assert recorder.received[0].message["Subject"] == "Line one line two"


def test_421_reconnects_once_and_retries(server: Controller, recorder: Recorder):
    messages = [email(1, "ada@example.com"), email(2, "closing@example.com")]
    with make_provider(server.port) as provider:
        results = provider.send_batch(messages)
    assert [r.ok for r in results] == [True, True]
    assert [r.rcpt_tos for r in recorder.received] == [
        ["ada@example.com"],
        ["closing@example.com"],
    ]
    assert len(recorder.peers) == 2


def test_reconnects_when_the_server_dropped_an_idle_connection(recorder: Recorder):
    controller = start_server(recorder, timeout=0.5)  # the server hangs up after 0.5 s idle
    try:
        with make_provider(controller.port) as provider:
            assert provider.send_batch([email(1, "ada@example.com")])[0].ok
            time.sleep(1.2)
            results = provider.send_batch([email(2, "grace@example.com"), email(3, "x@ex.com")])
    finally:
        controller.stop()
    assert [r.ok for r in results] == [True, True]
    assert len(recorder.received) == 3
    assert len(recorder.peers) == 2


def test_timeout_is_transient_and_the_batch_goes_on(recorder: Recorder):
    recorder.slow_seconds = 1.5
    controller = start_server(recorder)
    try:
        with make_provider(controller.port, timeout=0.5) as provider:
            slow, fine = provider.send_batch(
                [email(1, "slow@example.com"), email(2, "ada@example.com")]
            )
        time.sleep(1.2)  # let the slow handler finish before the server stops
    finally:
        controller.stop()
    assert not slow.ok and slow.transient
    assert "timed out" in slow.error
    assert fine.ok


def test_unreachable_server_raises_provider_unavailable():
    provider = make_provider(free_port())  # nothing listens there
    with pytest.raises(ProviderUnavailable, match="cannot connect"), provider:
        provider.send_batch([email(1, "ada@example.com")])


def test_empty_batch_does_not_connect():
    with make_provider(free_port()) as provider:
        assert provider.send_batch([]) == []


# -- TLS and AUTH ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the client trusts it via SSL_CERT_FILE)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def authenticate(server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
    ok = isinstance(auth_data, LoginPassword) and auth_data == (
        USERNAME.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd answers 535


def start_tls_server(
    recorder: Recorder, tls_files: tuple[Path, Path], mode: str, monkeypatch: pytest.MonkeyPatch
) -> Controller:
    cert_path, key_path = tls_files
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    options: dict[str, Any] = {"auth_required": True, "authenticator": authenticate}
    if mode == "starttls":
        options.update(tls_context=context, require_starttls=True)
    else:
        # The TLS is the listener's and aiosmtpd cannot tell it is there: offer AUTH without
        # requiring it (requiring it without "TLS" makes aiosmtpd warn).
        options.update(ssl_context=context, auth_require_tls=False, auth_required=False)
    return start_server(recorder, **options)


@pytest.fixture(params=["starttls", "ssl"])
def tls_server(
    request: pytest.FixtureRequest,
    recorder: Recorder,
    tls_files: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Controller, str]]:
    controller = start_tls_server(recorder, tls_files, request.param, monkeypatch)
    yield controller, request.param
    controller.stop()


def test_tls_and_login(tls_server: tuple[Controller, str], recorder: Recorder):
    controller, mode = tls_server
    credentials = {"username": USERNAME, "password": PASSWORD}
    provider = make_provider(controller.port, use_tls=mode, credentials=credentials)
    with provider:
        results = provider.send_batch([email(1, "ada@example.com"), email(2, "bob@example.com")])
    assert [r.ok for r in results] == [True, True]
    assert len(recorder.received) == 2
    assert len(recorder.peers) == 1


def test_refused_login_raises_and_never_logs_the_password(
    tls_server: tuple[Controller, str], recorder: Recorder, caplog: pytest.LogCaptureFixture
):
    controller, mode = tls_server
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-password-xyz"
    provider = make_provider(
        controller.port, use_tls=mode, credentials={"username": USERNAME, "password": wrong}
    )
    with pytest.raises(ProviderUnavailable, match="refused the login") as raised, provider:
        provider.send_batch([email(1, "ada@example.com")])
    assert wrong not in str(raised.value)
    assert wrong not in caplog.text
    assert recorder.received == []


def test_untrusted_certificate_is_unavailable(
    tls_server: tuple[Controller, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    controller, mode = tls_server
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(empty))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    provider = make_provider(
        controller.port, use_tls=mode, credentials={"username": USERNAME, "password": PASSWORD}
    )
    with pytest.raises(ProviderUnavailable, match="CERTIFICATE_VERIFY_FAILED"), provider:
        provider.send_batch([email(1, "ada@example.com")])


def test_plain_connection_to_a_starttls_only_server_cannot_log_in(
    recorder: Recorder, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
):
    controller = start_tls_server(recorder, tls_files, "starttls", monkeypatch)
    provider = make_provider(
        controller.port, use_tls="none", credentials={"username": USERNAME, "password": PASSWORD}
    )
    try:
        with pytest.raises(ProviderUnavailable, match="AUTH"), provider:
            provider.send_batch([email(1, "ada@example.com")])
    finally:
        controller.stop()


# -- configuration ---------------------------------------------------------------------------


def test_validate_names_the_bad_fields():
    errors = SmtpProvider.validate({"port": 70000, "use_tls": "maybe"}, {"password": "x"})
    fields = {e.field for e in errors}
    assert fields == {
        "settings.host",
        "settings.from_email",
        "settings.port",
        "settings.use_tls",
        "credentials.username",
    }
    errors = SmtpProvider.validate(
        {"host": "mail", "port": 0, "from_email": "not-an-address", "timeout": -1}, {}
    )
    assert {e.field for e in errors} == {"settings.port", "settings.from_email", "settings.timeout"}
    assert SmtpProvider.validate({"host": "mail", "port": "abc", "from_email": SENDER}, {}) != []
    good = {
        "host": "smtp.internal",
        "port": 587,
        "use_tls": True,
        "from_email": "ops@corp.internal",
    }
    assert SmtpProvider.validate(good, {"username": "u", "password": "p"}) == []
    assert SmtpProvider.validate({"host": "mail", "from_email": SENDER}, {}) == []


def test_tls_modes():
    assert tls_mode(True) == "starttls"
    assert tls_mode(False) == "none"
    assert tls_mode("SSL") == "ssl"
    assert tls_mode(None, 465) == "ssl"
    assert tls_mode(None, 587) == "starttls"
    with pytest.raises(ValueError, match="use_tls"):
        tls_mode("tls1.3")
    assert make_provider(None, use_tls="ssl").port == 465
    assert make_provider("", use_tls="none").port == 25
    assert make_provider("2525", use_tls=True).port == 2525


def test_non_ascii_names_subjects_and_addresses(recorder: Recorder):
    """A non-ASCII display name and subject are encoded; a non-ASCII address needs SMTPUTF8,
    which this server does not offer: refused for good.
    """
    server = start_server(recorder, enable_SMTPUTF8=False)
    message = Message(
        1, Channel.EMAIL, "zoë@example.com", {"subject": "Ça marche ✓", "text": "Grüße"}
    )
    latin = Message(2, Channel.EMAIL, "ada@example.com", {"subject": "Ça marche ✓", "text": "ü"})
    try:
        with make_provider(server.port, from_name="Équipe Whistle") as provider:
            international, plain = provider.send_batch([message, latin])
    finally:
        server.stop()
    assert not international.ok and not international.transient
    assert "SMTPUTF8" in international.error
    assert plain.ok
    (received,) = recorder.received
    assert received.message["Subject"] == "Ça marche ✓"
    assert received.message["From"].addresses[0].display_name == "Équipe Whistle"
    assert received.message.get_content().strip() == "ü"


def test_smtputf8_server_takes_an_internationalized_address(recorder: Recorder):
    controller = start_server(recorder, enable_SMTPUTF8=True)
    try:
        message = Message(1, Channel.EMAIL, "zoë@example.com", {"subject": "Hi", "text": "x"})
        with make_provider(controller.port) as provider:
            (result,) = provider.send_batch([message])
    finally:
        controller.stop()
    assert result.ok, result.error
    assert recorder.received[0].rcpt_tos == ["zoë@example.com"]
    assert recorder.received[0].message["To"] == "zoë@example.com"
