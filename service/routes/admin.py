"""POST /admin/reload: load the model file again (or another file in the model directory), or
read the model repository again."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import APIRouter, Depends, Request

from mmoe.service.auth import require_api_key
from mmoe.service.errors import ApiError, PayloadError
from mmoe.service.http import read_request_body
from mmoe.service.openapi import ERROR_RESPONSES
from mmoe.service.payload import duplicate_key
from mmoe.service.predictor import ModelLoadError
from mmoe.service.state import get_registry
from mmoe.service.workers import Action

router = APIRouter(tags=["operations"], dependencies=[Depends(require_api_key)])


class ReloadRequest(msgspec.Struct, forbid_unknown_fields=True):
    path: str | None = None


@router.post(
    "/admin/reload",
    summary="Reload the model file (or read the repository again) in every worker, atomically: "
    "a bad file is rejected and what was served keeps serving",
    responses={
        **{k: v for k, v in ERROR_RESPONSES.items() if k != 503},
        403: {**ERROR_RESPONSES[422], "description": "Path outside the model directory"},
    },
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": msgspec.json.schema(ReloadRequest)}},
        }
    },
)
async def reload(request: Request) -> dict[str, Any]:
    registry = get_registry(request)
    body = await read_request_body(request, 4096)
    try:
        req = msgspec.json.decode(body, type=ReloadRequest) if body.strip() else ReloadRequest()
    except msgspec.ValidationError as err:
        raise PayloadError("path", str(err)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as err:
        raise PayloadError(None, f"malformed JSON: {err}", 400, "malformed_json") from None
    if duplicate_key(body) is not None:
        raise PayloadError("path", "given twice: give it once", 422, "duplicate_key")
    if registry.repository is not None:
        if req.path is not None:
            raise PayloadError(
                "path", "this server serves a repository: it reads it again, give no path"
            )
        failed = await registry.apply_everywhere(Action("sync"))
        return {
            "status": "reloaded" if failed is None else "partly_reloaded",
            "failed": failed,
            "models": [{"name": n, "version": v} for n, v in sorted(registry.serving.models)],
            "routing_error": registry.routing_error,
            "items_error": registry.items.error,
        }
    path = registry.resolve_file(req.path)
    await registry.refresh_items()
    try:
        model = await registry.load_file(path)
    except ModelLoadError as err:
        raise ApiError(
            422, "model_rejected", f"{err}; still serving the previous model", "path"
        ) from None
    failed = await registry.apply_elsewhere(Action("file", str(path)))
    if failed is not None:
        raise ApiError(
            422,
            "model_rejected",
            f"{failed}; those workers still serve the previous model",
            "path",
        )
    answer: dict[str, Any] = {
        "status": "reloaded",
        "model": model.name,
        "version": model.version,
        "path": str(path),
    }
    if registry.items.spec is not None:
        answer["items_error"] = registry.items.error
    return answer
