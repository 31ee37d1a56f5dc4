"""The OpenAPI document (/openapi.json, /docs): FastAPI's, plus POST /predict (a plain ASGI route
FastAPI does not document) with the request body of the model being served, and every msgspec
body's definitions moved to components."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "code": {"type": "string"},
                            "field": {"type": ["string", "null"]},
                            "reason": {"type": "string"},
                        },
                        "required": ["code", "reason"],
                    }
                },
                "required": ["error"],
            }
        }
    }
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed JSON", **_ERROR},
    401: {"description": "Missing or wrong API key", **_ERROR},
    413: {"description": "Body or row count over the limit", **_ERROR},
    415: {"description": "Body is not JSON", **_ERROR},
    422: {"description": "A field is wrong: see error.field and error.reason", **_ERROR},
    503: {"description": "Not ready, or overloaded (see Retry-After)", **_ERROR},
}

_PREDICT_RESPONSE = {
    "description": "Per-task scores, in candidate order",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "model": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
                    },
                    "n": {"type": "integer"},
                    "scores": {
                        "type": "object",
                        "additionalProperties": {"type": "array"},
                    },
                },
                "required": ["model", "n", "scores"],
            }
        }
    },
}

_PREDICT_DESCRIPTION = (
    "Columnar: `candidates` has one list per feature (all of length N), `context` has scalars "
    "shared by every candidate. Row form: `instances`. Optional `tasks` picks which tasks to "
    "return. Features with a default may be left out or null. Optional `model` (and `version`) "
    "name the model that scores the request; without them, routing decides."
)


def predict_operation(request_schema: dict[str, Any] | None) -> dict[str, Any]:
    """The OpenAPI operation for POST /predict, with the request body of the loaded model."""
    op: dict[str, Any] = {
        "tags": ["scoring"],
        "summary": "Score candidates",
        "description": _PREDICT_DESCRIPTION,
        "operationId": "predict_predict_post",
    }
    if request_schema is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": request_schema}},
        }
    op["responses"] = {
        "200": _PREDICT_RESPONSE,
        **{str(status): response for status, response in ERROR_RESPONSES.items()},
        "404": {"description": "The model or version the body names is not served", **_ERROR},
    }
    return op


def document(app: FastAPI, request_schema: dict[str, Any] | None) -> dict[str, Any]:
    """The whole document, with /predict's body given by `request_schema` (the loaded model's
    decoder; None while no model is loaded)."""
    # A copy: FastAPI's document shares the routes' openapi_extra dicts, edited below.
    schema = copy.deepcopy(
        get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
    )
    components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
    if request_schema is not None:
        request_schema = dict(request_schema)
        components.update(request_schema.pop("$defs", {}))
        request_schema = _rewrite_refs(request_schema)
    schema["paths"] = {"/predict": {"post": predict_operation(request_schema)}, **schema["paths"]}
    # Other msgspec-documented bodies (reload, KServe infer) carry their own $defs; OpenAPI
    # resolves a $ref against the whole document, so they move to components too.
    for item in schema["paths"].values():
        for operation in item.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                components.update(media["schema"].pop("$defs", {}))
                media["schema"] = _rewrite_refs(media["schema"])
    schema["components"]["schemas"] = _rewrite_refs(components)
    return schema


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (v.replace("#/$defs/", "#/components/schemas/") if k == "$ref" else _rewrite_refs(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node
