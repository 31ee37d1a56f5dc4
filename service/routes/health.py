"""Liveness, readiness and what is being served."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mmoe.service.state import get_holder, get_metrics, get_settings

router = APIRouter(tags=["operations"])


@router.get("/livez", summary="The process is up")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="A model is loaded and warmed up (in every worker)",
    responses={503: {"description": "Not ready; `reason` says why"}},
)
async def readyz(request: Request) -> Response:
    holder = get_holder(request)
    ready, reason = holder.ready()
    model = holder.current
    if not ready or model is None:
        return JSONResponse({"status": "not_ready", "reason": reason}, 503)
    return JSONResponse({"status": "ready", "model": model.name, "version": model.version})


@router.get("/metadata", summary="Features, tasks, model version, execution provider, batching")
async def metadata(request: Request) -> dict[str, Any]:
    model, settings = get_holder(request).require(), get_settings(request)
    meta = model.predictor.meta
    return {
        "model": {
            "name": meta.name,
            "version": meta.version,
            "config_hash": meta.config_hash,
            "exported_at": meta.exported_at,
            "metrics": meta.metrics,
            "path": str(model.predictor.path),
            "loaded_at": model.loaded_at,
        },
        "provider": model.predictor.provider,
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
            "lone_request_threads": model.predictor.lone_threads,
            "max_queue": settings.max_queue,
            "max_batch_rows": settings.max_batch_rows,
            "request_timeout_ms": settings.request_timeout_ms,
        },
    }


@router.get("/metrics", summary="Prometheus metrics (of every worker)", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(get_metrics(request).exposition(), media_type=CONTENT_TYPE_LATEST)
