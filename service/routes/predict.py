"""POST /predict: score the candidates of one ranking request."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service.deps import get_holder, get_settings, read_json_body, require_api_key, run_inference

router = APIRouter(tags=["scoring"])

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

PREDICT_RESPONSE = {
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


@router.post(
    "/predict",
    summary="Score candidates",
    description=(
        "Columnar: `candidates` has one list per feature (all of length N), `context` has "
        "scalars shared by every candidate. Row form: `instances`. Optional `tasks` picks "
        "which tasks to return. Features with a default may be left out or null."
    ),
    dependencies=[Depends(require_api_key)],
    responses={200: PREDICT_RESPONSE, **ERROR_RESPONSES},
    openapi_extra={"x-model-request-body": True},
)
async def predict(request: Request) -> Response:
    model = get_holder(request).require()  # called, not Depends(): no thread-pool hop
    body = await read_json_body(request, get_settings(request).max_body_bytes)
    decoded = model.decoder.decode(body)
    outputs = await run_inference(request, model, decoded.feeds, decoded.n)
    task_out = model.predictor.task_outputs
    payload = {
        "model": {"name": model.name, "version": model.version},
        "n": decoded.n,
        "scores": {t: outputs[task_out[t]] for t in decoded.tasks},
    }
    return Response(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
    )
