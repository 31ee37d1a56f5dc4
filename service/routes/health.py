"""Liveness, readiness and what is being served."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mmoe.service.deps import get_holder, get_metrics, get_settings

router = APIRouter(tags=["operations"])


@router.get("/livez", summary="The process is up")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="A model is loaded and warmed up",
    responses={503: {"description": "Not ready; `reason` says why"}},
)
async def readyz(request: Request) -> Response:
    holder = get_holder(request)
    model = holder.current
    if model is None:
        return JSONResponse({"status": "not_ready", "reason": holder.not_ready_reason}, 503)
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
            "inference_workers": settings.inference_workers,
            "intra_op_threads": settings.intra_op_threads,
            "intra_op_spinning": settings.intra_op_spinning,
            "max_queue": settings.max_queue,
            "max_batch_rows": settings.max_batch_rows,
            "request_timeout_ms": settings.request_timeout_ms,
        },
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    m = get_metrics(request)
    holder = get_holder(request)
    if holder.current is not None:
        m.queue_depth.set(holder.current.runner.waiting)
        m.inflight.set(holder.current.runner.inflight)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
