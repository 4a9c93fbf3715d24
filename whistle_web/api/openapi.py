"""The OpenAPI 3.1 document, generated from the registered operations and their pydantic
models (never written by hand), and Swagger UI served from the npm-installed bundle."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, jsonify, render_template
from pydantic import TypeAdapter

from whistle_web.api.framework import OPERATIONS, Operation, is_integer_param

schema_bp = Blueprint("api_schema", __name__, url_prefix="/api/schema")

PROBLEM = {
    "type": "object",
    "description": "RFC 9457 problem details.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                "required": ["field", "message"],
            },
        },
    },
    "required": ["title", "status"],
}
STANDARD_ERRORS = {
    400: "Malformed request",
    401: "Missing, bad or revoked credentials",
    403: "The credential lacks the scope",
    404: "Not found (or in another organization)",
    409: "Conflict with the current state",
    413: "Body too large",
    422: "Invalid content; `errors` names each field",
    429: "Rate limited; see Retry-After",
}


def _schema(annotation: Any, components: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(annotation).json_schema(
        ref_template="#/components/schemas/{model}", mode="serialization"
    )
    components.update(schema.pop("$defs", {}))
    return schema


def _input_schema(model: Any, components: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(model).json_schema(
        ref_template="#/components/schemas/{model}", mode="validation"
    )
    components.update(schema.pop("$defs", {}))
    name = model.__name__
    components[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


def _path_params(op: Operation) -> list[dict[str, Any]]:
    params = []
    for name in re.findall(r"{(\w+)}", op.path):
        is_int = is_integer_param(name)
        params.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "integer", "minimum": 1} if is_int else {"type": "string"},
            }
        )
    return params


def _query_params(op: Operation, components: dict[str, Any]) -> list[dict[str, Any]]:
    if op.query is None:
        return []
    schema = op.query.model_json_schema()
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema.get("properties", {}).items():
        params.append({"name": name, "in": "query", "required": name in required, "schema": prop})
    return params


def _operation_id(op: Operation) -> str:
    return f"{op.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', op.path.lower()).strip('_')}"


def build_document() -> dict[str, Any]:
    components: dict[str, Any] = {"Problem": PROBLEM}
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        responses: dict[str, Any] = {}
        if op.response is None:
            responses[str(op.status)] = {"description": "Done"}
        else:
            responses[str(op.status)] = {
                "description": op.summary,
                "content": {"application/json": {"schema": _schema(op.response, components)}},
            }
        codes = set(op.errors)
        if op.auth != "none":
            codes |= {401, 403}
        if op.body is not None:
            codes |= {400, 413, 422}
        if op.query is not None:
            codes |= {422}
        if "{" in op.path:
            codes |= {404}
        if op.idempotent:
            codes |= {409}
        codes |= {429}
        for code in sorted(codes):
            responses[str(code)] = {
                "description": STANDARD_ERRORS.get(code, "Error"),
                "content": {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                },
            }
        operation: dict[str, Any] = {
            "operationId": _operation_id(op),
            "summary": op.summary,
            "tags": op.tags,
            "parameters": _path_params(op) + _query_params(op, components),
            "responses": responses,
        }
        if op.description:
            operation["description"] = op.description
        if op.idempotent:
            operation["parameters"].append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 255},
                    "description": "Replays the first response for 24 hours.",
                }
            )
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _input_schema(op.body, components)}},
            }
        operation["security"] = (
            []
            if op.auth == "none"
            else [{"recipientToken": []}]
            if op.auth == "recipient"
            else [{"bearer": []}]
        )
        paths.setdefault(f"/api/v1{op.path}", {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Whistle API",
            "version": "1.0.0",
            "description": "Send notifications and manage recipients, preferences, templates and "
            "campaigns. Authenticate with `Authorization: Bearer <API key>`.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An organization API key (whk_...) or a staff access token.",
                },
                "recipientToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A recipient token (the in-app widget's), from "
                    "`POST /api/v1/recipients/{external_id}/token` or minted with the "
                    "organization's widget secret.",
                },
            },
        },
    }


_document: dict[str, Any] | None = None


@schema_bp.get("/openapi.json")
def openapi_json():  # type: ignore[no-untyped-def]
    global _document
    if _document is None:
        _document = build_document()
    return jsonify(_document)


@schema_bp.get("/swagger-ui/")
def swagger_ui():  # type: ignore[no-untyped-def]
    return render_template("api/swagger_ui.html")
