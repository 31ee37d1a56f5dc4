"""Liveness, readiness and what is being served."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mmoe.service.openapi import ERROR_RESPONSES
from mmoe.service.state import get_metrics, get_registry, get_settings

router = APIRouter(tags=["operations"])


@router.get("/livez", summary="The process is up")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="Every model that routing sends traffic to is loaded and warmed up (in every worker)",
    responses={503: {"description": "Not ready; `reason` says why"}},
)
async def readyz(request: Request) -> Response:
    registry = get_registry(request)
    ready, reason = registry.ready()
    model = registry.default_model()
    if not ready:
        return JSONResponse({"status": "not_ready", "reason": reason}, 503)
    answer: dict[str, Any] = {"status": "ready"}
    if model is not None:
        answer |= {"model": model.name, "version": model.version}
    if len(registry.serving.models) > 1:
        answer["models"] = [{"name": n, "version": v} for n, v in sorted(registry.serving.models)]
    return JSONResponse(answer)


@router.get(
    "/metadata",
    summary="A model's features, tasks, version, execution provider and batching; the models "
    "served and their routing",
    responses={
        404: {**ERROR_RESPONSES[422], "description": "The model or version named is not served"},
        503: ERROR_RESPONSES[503],
    },
)
async def metadata(
    request: Request, model: str | None = None, version: str | None = None
) -> dict[str, Any]:
    """The model `model` (and `version`) names, else the one /predict scores for a caller
    that names none."""
    registry, settings = get_registry(request), get_settings(request)
    served = registry.resolve(model, version)[0]
    meta = served.predictor.meta
    return {
        "model": {
            "name": served.name,
            "version": served.version,
            # The file's own name and version (a repository names a model by its folders).
            "exported_as": {"name": meta.name, "version": meta.version},
            "config_hash": meta.config_hash,
            "exported_at": meta.exported_at,
            "metrics": meta.metrics,
            "path": str(served.path),
            "loaded_at": served.loaded_at,
        },
        "provider": served.predictor.provider,
        "features": [f.model_dump() | {"required": f.required} for f in meta.features],
        "tasks": [t.model_dump() for t in meta.tasks],
        # The monitoring outputs and their training-time references (docs/monitoring.md).
        "monitor": meta.monitor.model_dump() if meta.monitor is not None else None,
        "batching": {
            "dynamic": settings.batch_max_rows > 0,
            "batch_max_rows": settings.batch_max_rows,
            "batch_wait_ms": settings.batch_wait_ms,
            "workers": settings.workers,
            "inference_workers": settings.inference_workers,
            "intra_op_threads": settings.intra_op_threads,
            # 0: no lone-request session (off, on a GPU, or no more threads than a call has)
            "lone_request_threads": served.predictor.lone_threads,
            "max_queue": settings.max_queue,
            "max_batch_rows": settings.max_batch_rows,
            "request_timeout_ms": settings.request_timeout_ms,
        },
        # The item features held for it (MMOE_ITEMS; docs/items.md): file or Redis, rows, when
        # loaded, and why the last refresh was refused, if it was.
        "items": None
        if registry.items.spec is None
        else {
            **(served.items.describe() if served.items is not None else {}),
            "error": registry.items.error,
        },
        "models": [
            {"name": m.name, "version": m.version, "path": str(m.path), "loaded_at": m.loaded_at}
            for m in sorted(registry.serving.models.values(), key=lambda m: m.key)
        ],
        "repository": None
        if registry.repository is None
        else {
            "path": str(registry.repository),
            "routing": registry.serving.router.config.model_dump(),
            "routing_error": registry.routing_error,
            "poll_s": settings.repository_poll_s,
        },
    }


@router.get("/metrics", summary="Prometheus metrics (of every worker)", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(get_metrics(request).exposition(), media_type=CONTENT_TYPE_LATEST)
