"""RFC 9457 problem details for API errors."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from flask import Response, jsonify

PROBLEM_JSON = "application/problem+json"


def problem(status: int, detail: str | None = None, **extra: Any) -> Response:
    title = HTTPStatus(status).phrase
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    body["detail"] = detail or title
    body.update(extra)
    response = jsonify(body)
    response.status_code = status
    response.mimetype = PROBLEM_JSON
    return response
