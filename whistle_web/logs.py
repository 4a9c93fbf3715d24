"""Logging: readable lines in development, one JSON object per line in production."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

# Never let a credential reach a log line: API keys, bearer tokens, URL passwords.
_SECRET_PATTERNS = (
    (re.compile(r"whk_[a-z0-9]{10}_[A-Za-z0-9_\-]+"), "whk_***"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]+"), r"\1***"),
    (re.compile(r"(://[^:/@\s]+:)[^@\s]+@"), r"\1***@"),
)


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in ("job_id", "organization_id", "request_id"):
            if hasattr(record, key):
                payload[key] = getattr(record, key)
        if record.exc_info:
            payload["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(payload)


def configure_logging(level: str, *, json_logs: bool) -> None:
    root = logging.getLogger()
    if getattr(root, "_whistle_configured", False):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if json_logs
        else RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level)
    root._whistle_configured = True  # type: ignore[attr-defined]
