"""The platform's own mail (password resets), sent off the request."""

from __future__ import annotations

from rq import Queue

from whistle_web import get_redis, system_mail
from workers.queues import HIGH


def send_system_mail(to: str, subject: str, text: str) -> None:
    """Send one message through ``WHISTLE_MAIL_URL``."""
    system_mail.send_now(to, subject, text)


def enqueue_system_mail(to: str, subject: str, text: str) -> None:
    # The job's arguments hold a reset link: delete the job once sent, failures soon after.
    Queue(HIGH, connection=get_redis()).enqueue(
        send_system_mail,
        args=(to, subject, text),
        result_ttl=0,
        failure_ttl=3600,
        description=f"system mail: {subject}",
    )
