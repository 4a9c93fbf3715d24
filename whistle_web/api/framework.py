"""How an API endpoint is declared: one decorator gives auth, scopes, tenancy, validation,
idempotency, serialisation and its OpenAPI entry.

    @endpoint(bp, "POST", "/topics", scope="audiences:write", body=TopicIn,
              response=TopicOut, status=201, summary="Create a topic", tags=["Topics"])
    def create_topic(body: TopicIn) -> TopicOut: ...

The view receives the validated ``body`` (and ``query``) models and path arguments, runs
inside the caller's organization scope, and returns a pydantic model (or a list, or None
for 204). Domain errors become problem+json (see :mod:`whistle_web.api.problems`).
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from flask import Blueprint, Response, g, request
from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select

from whistle_web.api.problems import problem
from whistle_web.errors import DomainError

M = TypeVar("M", bound=BaseModel)
MAX_LIMIT = 200


class Schema(BaseModel):
    """Base for request bodies: unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Out(BaseModel):
    """Base for responses."""

    model_config = ConfigDict(from_attributes=True)


@dataclass
class Operation:
    method: str
    path: str
    summary: str
    tags: list[str]
    scope: str | None
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    response: Any
    status: int
    # True: Idempotency-Key is handled here (api/idempotency.py: a stored response);
    # "handler": the view handles it with its own write (still documented as accepted).
    idempotent: bool | Literal["handler"]
    auth: str  # "key" (API key or staff token), "none", "recipient"
    description: str = ""
    errors: list[int] = field(default_factory=list)


OPERATIONS: list[Operation] = []


def endpoint(
    bp: Blueprint,
    method: str,
    path: str,
    *,
    summary: str,
    tags: list[str],
    scope: str | None = None,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    response: Any = None,
    status: int = 200,
    idempotent: bool | Literal["handler"] = False,
    auth: str = "key",
    errors: list[int] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an API view (see the module docstring)."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        operation = Operation(
            method=method.upper(),
            path=path,
            summary=summary,
            tags=tags,
            scope=scope,
            body=body,
            query=query,
            response=response,
            status=status,
            idempotent=idempotent,
            auth=auth,
            description=(view.__doc__ or "").strip(),
            errors=errors or [],
        )
        OPERATIONS.append(operation)

        @functools.wraps(view)
        def wrapper(**path_args: Any) -> Response:
            from whistle_web.api import auth as api_auth
            from whistle_web.api import idempotency

            try:
                _check_path_args(path_args)
                if operation.auth == "key":
                    api_auth.authenticate(operation.scope)
                elif operation.auth == "recipient":
                    api_auth.authenticate_recipient()
                kwargs = dict(path_args)
                raw_body: bytes = b""
                if operation.body is not None:
                    raw_body = request.get_data(cache=True)
                    kwargs["body"] = parse_body(operation.body, raw_body)
                if operation.query is not None:
                    kwargs["query"] = parse_query(operation.query)
                if operation.idempotent is True and request.headers.get("Idempotency-Key"):
                    return idempotency.run(
                        request.headers["Idempotency-Key"],
                        raw_body,
                        lambda: _respond(operation, view(**kwargs)),
                    )
                return _respond(operation, view(**kwargs))
            except DomainError as error:
                return problem(
                    error.status,
                    error.detail,
                    **(
                        {"errors": [e.__dict__ for e in error.errors]}
                        if hasattr(error, "errors")
                        else {}
                    ),
                )

        bp.add_url_rule(
            _flask_rule(path), endpoint=view.__name__, view_func=wrapper, methods=[operation.method]
        )
        return wrapper

    return decorate


def _flask_rule(path: str) -> str:
    """``/recipients/{external_id}`` -> ``/recipients/<path:external_id>`` etc."""
    out = []
    for part in path.split("/"):
        if part.startswith("{") and part.endswith("}"):
            name = part[1:-1]
            converter = "int:" if is_integer_param(name) else ""
            out.append(f"<{converter}{name}>")
        else:
            out.append(part)
    return "/".join(out)


MAX_ID = 2**63 - 1


def _check_path_args(path_args: dict[str, Any]) -> None:
    """Ids beyond BIGINT and text with NUL characters can name nothing: 404, not a 500."""
    from whistle_web.errors import NotFound

    for value in path_args.values():
        if (isinstance(value, int) and not 0 < value <= MAX_ID) or (
            isinstance(value, str) and "\x00" in value
        ):
            raise NotFound("Not found.")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _nul_path(value: Any, path: str = "") -> str | None:
    """The JSON path of the first string containing a NUL character (PostgreSQL refuses them)."""
    if isinstance(value, str):
        return (path or "body") if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return child
            found = _nul_path(item, child)
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found:
                return found
    return None


def is_integer_param(name: str) -> bool:
    """Path parameters named ``id`` or ``*_id`` are integers; ``external_id`` and keys are text."""
    return name == "id" or (name.endswith("_id") and name != "external_id")


def parse_body(model: type[M], raw: bytes) -> M:
    if not raw:
        raise BodyError("A JSON body is required.")
    if request.mimetype != "application/json":
        raise BodyError("Send the body as application/json.", status=415)
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as error:
        raise BodyError(f"The body is not valid JSON: {error}") from None
    bad = _nul_path(data)
    if bad is not None:
        from whistle_web.errors import ValidationError

        raise ValidationError.single(bad, "NUL characters are not allowed.")
    try:
        return model.model_validate(data)
    except PydanticValidationError as error:
        raise ApiValidationError(error) from None


def parse_query(model: type[M]) -> M:
    data = {key: request.args.getlist(key) for key in request.args}
    flat = {k: v if len(v) > 1 else v[0] for k, v in data.items()}
    bad = _nul_path(flat)
    if bad is not None:
        from whistle_web.errors import ValidationError

        raise ValidationError.single(bad, "NUL characters are not allowed.")
    try:
        return model.model_validate(flat)
    except PydanticValidationError as error:
        raise ApiValidationError(error) from None


class BodyError(DomainError):
    status = 400
    title = "Bad request"

    def __init__(self, detail: str, *, status: int = 400) -> None:
        super().__init__(detail)
        self.status = status


class ApiValidationError(DomainError):
    """A pydantic error, reported with JSON paths like ``to[3].email``."""

    status = 422

    def __init__(self, error: PydanticValidationError) -> None:
        self.errors = [_FieldError(field_path(item["loc"]), item["msg"]) for item in error.errors()]
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in self.errors))


@dataclass(frozen=True)
class _FieldError:
    field: str
    message: str


def field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def _respond(operation: Operation, result: Any) -> Response:
    if result is None:
        return Response(status=204)
    if isinstance(result, Response):
        return result
    return json_response(result, operation.status)


def json_response(result: Any, status: int) -> Response:
    """A response model (or list, or dict of them) as the API's JSON answer."""
    return Response(
        json.dumps(_dump(result), separators=(",", ":"), default=str),
        status=status,
        mimetype="application/json",
    )


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


# --- cursor pagination ------------------------------------------------------------------


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([last_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id the next page starts after (pages run newest first, by id)."""
    if not cursor:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        (last_id,) = json.loads(base64.urlsafe_b64decode(padded))
        if isinstance(last_id, int) and last_id > 0:
            return last_id
    except (ValueError, TypeError):
        pass
    from whistle_web.errors import ValidationError

    raise ValidationError.single("cursor", "Not a cursor returned by this API.")


def page(
    stmt: Any, id_column: Any, *, limit: int, cursor: str | None
) -> tuple[list[Any], str | None]:
    """Keyset pagination newest first: stable when rows are added between pages."""
    from whistle_web.extensions import db

    after = decode_cursor(cursor)
    if after is not None:
        stmt = stmt.where(id_column < after)
    rows = list(db.session.scalars(stmt.order_by(id_column.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].id) if more and rows else None


def values_by_id(id_column: Any, value_column: Any, ids: set[int]) -> dict[int, Any]:
    """One column of the rows with these ids, by id, in one query (none for no ids)."""
    from whistle_web.extensions import db

    if not ids:
        return {}
    rows = db.session.execute(select(id_column, value_column).where(id_column.in_(ids)))
    return {row[0]: row[1] for row in rows}


def current_actor() -> Any:
    return g.api_actor
