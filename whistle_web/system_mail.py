"""The platform's own mail (password resets), sent through ``WHISTLE_MAIL_URL``.

This is not a notification channel: it has no provider row, no tracking and no
organization. The request enqueues a job that talks to SMTP, so a page never waits on a
mail server (and answers as fast whether or not a message was sent).
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from urllib.parse import unquote, urlsplit

from flask import current_app

log = logging.getLogger(__name__)

SCHEMES = {
    "smtp": ("plain", 25),
    "smtp+starttls": ("starttls", 587),
    "smtp+ssl": ("ssl", 465),
    "smtps": ("ssl", 465),
}
TIMEOUT = 15


class MailConfigError(ValueError):
    """``WHISTLE_MAIL_URL`` is not a usable SMTP URL."""


@dataclass(frozen=True)
class MailServer:
    host: str
    port: int
    security: str  # plain | starttls | ssl
    username: str
    password: str


def parse_mail_url(url: str) -> MailServer:
    """Raises MailConfigError: an unknown scheme or no host."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise MailConfigError(
            "WHISTLE_MAIL_URL must look like smtp[+starttls|+ssl]://user:password@host:port"
        )
    security, default_port = SCHEMES[parts.scheme]
    return MailServer(
        host=parts.hostname,
        port=parts.port or default_port,
        security=security,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
    )


def build_message(sender: str, to: str, subject: str, text: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2].strip(">") or None)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    return message


def deliver(server: MailServer, message: EmailMessage) -> None:
    """Send one message; SMTP errors propagate (the job retries or fails visibly)."""
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if server.security == "ssl":
        smtp = smtplib.SMTP_SSL(server.host, server.port, timeout=TIMEOUT, context=context)
    else:
        smtp = smtplib.SMTP(server.host, server.port, timeout=TIMEOUT)
    with smtp:
        if server.security == "starttls":
            smtp.starttls(context=context)
        if server.username:
            smtp.login(server.username, server.password)
        smtp.send_message(message)


def send_now(to: str, subject: str, text: str) -> None:
    """Send with the configured server (``workers.mail`` runs this)."""
    config = current_app.config
    message = build_message(config["WHISTLE_MAIL_FROM"], to, subject, text)
    deliver(parse_mail_url(config["WHISTLE_MAIL_URL"]), message)
    log.info("system mail %r sent to user mailbox", subject)


def send(to: str, subject: str, text: str, *, log_instead: str) -> None:
    """Enqueue a message, or without ``WHISTLE_MAIL_URL`` log ``log_instead`` (development
    and test; the text to log must hold no password) or warn (production)."""
    config = current_app.config
    if not config["WHISTLE_MAIL_URL"]:
        if config["WHISTLE_ENV"] == "production":
            log.warning("WHISTLE_MAIL_URL is not set: %r was not sent", subject)
        else:
            log.info("WHISTLE_MAIL_URL is not set; instead of mailing %s: %s", to, log_instead)
        return
    from workers.mail import enqueue_system_mail

    enqueue_system_mail(to, subject, text)
