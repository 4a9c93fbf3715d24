"""Email over SMTP: one connection per provider object, reused for the whole batch.

Settings: ``host``, ``port``, ``use_tls`` ("starttls", "ssl" or "none"; booleans map to
"starttls" / "none"), ``from_email``, optional ``from_name`` and ``timeout`` (seconds).
Credentials: optional ``username`` and ``password`` (AUTH after TLS is up).

A recipient the server refuses with a 5xx is a permanent failure; 4xx replies, timeouts and
lost connections are transient. Being unable to connect or log in at all raises
:class:`ProviderUnavailable` so the worker can fail over to another provider.
"""

from __future__ import annotations

import contextlib
import logging
import smtplib
import ssl
from collections.abc import Sequence
from email.utils import formataddr, formatdate, make_msgid
from typing import Any

from email_validator import EmailNotValidError, validate_email

from whistle_web.channels import mime
from whistle_web.channels.base import (
    BaseProvider,
    Message,
    ProviderUnavailable,
    SendResult,
    register,
)
from whistle_web.channels.kinds import ProviderKind
from whistle_web.errors import FieldError

log = logging.getLogger(__name__)

TLS_MODES = ("starttls", "ssl", "none")
DEFAULT_PORTS = {"starttls": 587, "ssl": 465, "none": 25}
DEFAULT_TIMEOUT = 10.0
# Headers the provider writes itself; a message's own headers may not replace them.
_RESERVED_HEADERS = {"from", "to", "subject", "message-id", "date", "mime-version"}


def tls_mode(value: Any, port: Any = None) -> str:
    """Normalize ``use_tls``: booleans, the three mode names, or unset (465 means "ssl")."""
    if value is None or value == "":
        return "ssl" if _as_int(port) == 465 else "starttls"
    if isinstance(value, bool):
        return "starttls" if value else "none"
    mode = str(value).strip().lower()
    if mode not in TLS_MODES:
        raise ValueError(f"use_tls must be one of {', '.join(TLS_MODES)}")
    return mode


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def address_error(value: Any) -> str | None:
    """The error message for a bad address, or None when it is fine."""
    if not isinstance(value, str) or not value.strip():
        return "This setting is required."
    try:
        # Self-hosted teams send from internal domains too (.internal, .local).
        validate_email(value.strip(), check_deliverability=False, globally_deliverable=False)
    except EmailNotValidError as exc:
        return f"Not an email address: {exc}"
    return None


@register
class SmtpProvider(BaseProvider):
    kind = ProviderKind.SMTP
    required_settings = ("host", "from_email")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._smtp: smtplib.SMTP | None = None
        self._from_header: str | None = None  # the same for every message: built once

    # -- configuration -------------------------------------------------------------------

    @classmethod
    def validate(cls, settings: dict[str, Any], credentials: dict[str, Any]) -> list[FieldError]:
        errors = super().validate(settings, credentials)
        failed = {e.field for e in errors}
        if "settings.from_email" not in failed:
            message = address_error(settings.get("from_email"))
            if message:
                errors.append(FieldError("settings.from_email", message))
        port = settings.get("port")
        if port not in (None, ""):
            number = _as_int(port)
            if number is None or not 1 <= number <= 65535:
                errors.append(FieldError("settings.port", "Must be a port number (1-65535)."))
        try:
            tls_mode(settings.get("use_tls"), port)
        except ValueError as exc:
            errors.append(FieldError("settings.use_tls", str(exc)))
        timeout = settings.get("timeout")
        if timeout not in (None, ""):
            try:
                ok = float(timeout) > 0 and not isinstance(timeout, bool)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                errors.append(
                    FieldError("settings.timeout", "Must be a positive number of seconds.")
                )
        if credentials.get("password") and not credentials.get("username"):
            errors.append(FieldError("credentials.username", "A password needs a username."))
        return errors

    @property
    def host(self) -> str:
        return str(self.settings["host"]).strip()

    @property
    def tls(self) -> str:
        return tls_mode(self.settings.get("use_tls"), self.settings.get("port"))

    @property
    def port(self) -> int:
        return _as_int(self.settings.get("port")) or DEFAULT_PORTS[self.tls]

    @property
    def timeout(self) -> float:
        return float(self.settings.get("timeout") or DEFAULT_TIMEOUT)

    @property
    def from_email(self) -> str:
        return str(self.settings["from_email"]).strip()

    # -- connection ----------------------------------------------------------------------

    def _connection(self) -> smtplib.SMTP:
        """The open connection, opened on first use (or after the server closed it)."""
        if self._smtp is not None and self._smtp.sock is not None:
            return self._smtp
        self._drop()
        self._smtp = self._connect()
        return self._smtp

    def _connect(self) -> smtplib.SMTP:
        host, port, tls = self.host, self.port, self.tls
        username = self.credentials.get("username") or ""
        password = self.credentials.get("password") or ""
        context = ssl.create_default_context() if tls != "none" else None
        smtp: smtplib.SMTP | None = None
        try:
            if tls == "ssl":
                smtp = smtplib.SMTP_SSL(host, port, timeout=self.timeout, context=context)
            else:
                smtp = smtplib.SMTP(host, port, timeout=self.timeout)
            smtp.ehlo()
            if tls == "starttls":
                smtp.starttls(context=context)
                smtp.ehlo()
            if username:
                smtp.login(username, password)
        except smtplib.SMTPAuthenticationError as exc:
            _quietly_close(smtp)
            raise ProviderUnavailable(
                f"SMTP {host}:{port} refused the login for {username!r} ({exc.smtp_code})"
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            _quietly_close(smtp)
            # str(exc) carries server replies and socket errors, never the credentials.
            raise ProviderUnavailable(f"cannot connect to SMTP {host}:{port}: {exc}") from None
        log.debug("smtp connected to %s:%s (tls=%s)", host, port, tls)
        return smtp

    def _drop(self) -> None:
        """Forget the connection without talking to the server (it is broken or gone)."""
        smtp, self._smtp = self._smtp, None
        _quietly_close(smtp)

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.sock is not None:
                smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            smtp.close()

    # -- sending -------------------------------------------------------------------------

    def send_batch(self, messages: Sequence[Message]) -> list[SendResult]:
        results: list[SendResult] = []
        retried = False  # one reconnect per batch when the server drops the connection
        for index, message in enumerate(messages):
            try:
                data, message_id = self._build(message)
            except (ValueError, TypeError) as exc:
                results.append(SendResult.failed(message.delivery_id, f"bad message: {exc}"))
                continue
            while True:
                try:
                    smtp = self._connection()
                except ProviderUnavailable as exc:
                    if not any(r.ok for r in results):
                        raise  # nothing of this batch went out: the worker fails over
                    # Never hand a half-sent batch to another provider: retry the rest later.
                    results += [
                        SendResult.failed(m.delivery_id, str(exc), transient=True)
                        for m in messages[index:]
                    ]
                    return results
                result, lost = self._send_one(smtp, data, message, message_id)
                if lost is None:
                    results.append(result)
                    break
                self._drop()
                if lost == "dropped" and not retried:
                    retried = True
                    continue
                results.append(result)
                break
        return results

    def _send_one(
        self, smtp: smtplib.SMTP, data: bytes, message: Message, message_id: str
    ) -> tuple[SendResult, str | None]:
        """The result, and why the connection is gone ("dropped", "timeout") if it is."""
        delivery_id = message.delivery_id
        try:
            options: list[str] = []
            if not (self.from_email.isascii() and message.to.isascii()):
                # An internationalized address: only a server that speaks SMTPUTF8 takes it.
                if not smtp.has_extn("smtputf8"):
                    raise smtplib.SMTPNotSupportedError(
                        "the address is not ASCII and the server does not support SMTPUTF8"
                    )
                options = ["SMTPUTF8", "BODY=8BITMIME"]
            smtp.sendmail(self.from_email, [message.to], data, mail_options=options)
        except smtplib.SMTPServerDisconnected as exc:
            # smtplib turns socket errors and timeouts into SMTPServerDisconnected.
            if isinstance(exc.__context__, TimeoutError):
                return SendResult.failed(delivery_id, "timed out", transient=True), "timeout"
            error = f"connection lost: {exc}"
            return SendResult.failed(delivery_id, error, transient=True), "dropped"
        except TimeoutError:
            return SendResult.failed(delivery_id, "timed out", transient=True), "timeout"
        except smtplib.SMTPRecipientsRefused as exc:
            code, reply = exc.recipients.get(message.to, (0, b""))
            return _refused(delivery_id, code, reply, "recipient refused"), _closing(code)
        except (smtplib.SMTPNotSupportedError, UnicodeError) as exc:
            # e.g. a non-ASCII address and a server without SMTPUTF8: will not change.
            return SendResult.failed(delivery_id, f"cannot send: {exc}"), None
        except smtplib.SMTPResponseException as exc:
            # SMTPSenderRefused, SMTPDataError, or a bad reply to any other command.
            result = _refused(delivery_id, exc.smtp_code, exc.smtp_error, "refused")
            return result, _closing(exc.smtp_code)
        except (smtplib.SMTPException, OSError) as exc:
            return SendResult.failed(delivery_id, f"smtp error: {exc}", transient=True), "error"
        return SendResult.sent(delivery_id, message_id), None

    def _build(self, message: Message) -> tuple[bytes, str]:
        """The message as bytes, ready for ``sendmail``, and its Message-ID.

        Written by :mod:`whistle_web.channels.mime` rather than the ``email`` generator:
        the generator was a third of a worker's CPU at a thousand messages a second.

        Raises:
            ValueError: a header value would break the header block (CR or LF in it), or a
                header line would be longer than SMTP allows.
        """
        content = message.content
        text, html = content.get("text"), content.get("html")
        if self._from_header is None:
            from_name = str(self.settings.get("from_name") or "").strip()
            self._from_header = mime.header(
                "From", formataddr((_single_line(from_name, "From"), self.from_email), "utf-8")
            )
        domain = self.from_email.rpartition("@")[2]
        headers = {name: value for name, value in message.headers.items() if value is not None}
        given = next((v for k, v in headers.items() if k.lower() == "message-id"), "")
        message_id = str(given).strip().strip("<>") or make_msgid(domain=domain).strip("<>")
        lines = [
            self._from_header,
            mime.header("To", _single_line(message.to, "To")),
            mime.subject_header(one_line(content.get("subject"))),
            mime.header("Date", formatdate(usegmt=True)),
            mime.header("Message-ID", f"<{_single_line(message_id, 'Message-ID')}>"),
        ]
        for name, value in headers.items():
            lowered = name.lower()
            if lowered in _RESERVED_HEADERS or lowered.startswith("content-"):
                continue
            name = _single_line(name, "header name")
            lines.append(mime.header(name, _single_line(str(value), name)))
        body = mime.build(
            lines,
            text=str(text) if text else None if html else "",
            html=str(html) if html else None,
        )
        return body, message_id


def _single_line(value: str, what: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{what} contains a line break")
    return value


def one_line(value: Any) -> str:
    """A subject on one line: templates may render line breaks into it."""
    return " ".join(str(value or "").split())


def _closing(code: int) -> str | None:
    """421 means the server is closing the connection (idle timeout, shutting down)."""
    return "dropped" if code == 421 else None


def _refused(delivery_id: int, code: int, reply: bytes | str, what: str) -> SendResult:
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    error = f"{what}: {code} {reply}".strip()
    # 5xx is final; 4xx (and anything unexpected) may work later.
    return SendResult.failed(delivery_id, error, transient=not 500 <= code < 600)


def _quietly_close(smtp: smtplib.SMTP | None) -> None:
    if smtp is not None:
        with contextlib.suppress(OSError):
            smtp.close()
