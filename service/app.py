"""The FastAPI app: create_app(settings) wires settings, metrics, the model registry and routes;
uvicorn_config(app, settings) is how it is served (one process, or each worker of several)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmoe.service import grpc_v2, openapi
from mmoe.service.cpu_share import CpuShare
from mmoe.service.errors import (
    ApiError,
    api_error_handler,
    http_error_handler,
    validation_error_handler,
)
from mmoe.service.metrics import ServiceMetrics
from mmoe.service.monitoring import Watched
from mmoe.service.observability import Observability
from mmoe.service.predictor import ProviderError, choose_providers
from mmoe.service.protocol import bounded_http_protocol
from mmoe.service.registry import ModelRegistry
from mmoe.service.routes import admin, health, kserve, predict
from mmoe.service.settings import Settings
from mmoe.service.shadow import ShadowScorer
from mmoe.service.workers import Action, WorkerLink

service_log = logging.getLogger("mmoe.service")


def create_app(
    settings: Settings | None = None,
    *,
    link: WorkerLink | None = None,
    share: CpuShare | None = None,
    model_path: Path | None = None,
    unloaded: list[str] | None = None,
) -> FastAPI:
    """The app. In a worker of a multi-process server, `link` connects it to its siblings,
    `share` is its view of their requests in progress, and `model_path` (the file they serve,
    else the configured one) or `unloaded` (the repository's models unloaded through its API)
    where it starts from; without them, the app is the whole server."""
    settings = settings or Settings()
    metrics = ServiceMetrics(
        Watched(settings.monitor_features, settings.monitor_gates, settings.monitor_scores)
    )
    if (link is None) != (share is None):
        raise ValueError("a worker's app takes both its link and its CpuShare")
    share = share or CpuShare.single_process()

    def cannot_serve(reason: str, event: str) -> None:
        service_log.critical(f"cannot serve: {reason}", extra={"event": event})
        if link is not None:
            link.fatal(reason)

    def stop_if_failed(loader: asyncio.Task[None]) -> None:
        """The start-up loader only ends by loading a model, being cancelled at shutdown, or
        hitting something retrying cannot fix (ProviderError): then stop rather than sit
        unready."""
        if loader.cancelled() or loader.exception() is None:
            return
        cannot_serve(str(loader.exception()), "model_load_fatal")
        signal.raise_signal(signal.SIGTERM)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            choose_providers(settings.provider)
        except ProviderError as err:  # a setting to fix: fail the start (non-zero exit)
            cannot_serve(str(err), "provider_unavailable")
            raise
        executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="onnxruntime")
        registry = ModelRegistry(
            settings, metrics, executor, share, link, model_path, unloaded or ()
        )
        registry.on_swap.append(lambda _: setattr(app, "openapi_schema", None))
        app.state.registry = registry
        shadows = ShadowScorer(metrics.shadow, share)
        app.state.shadows = shadows
        grpc_server = await grpc_v2.start(settings, registry, metrics, share, shadows)
        if link is not None:
            link.attach(registry.apply)
        loader = asyncio.create_task(registry.keep_loading())
        loader.add_done_callback(stop_if_failed)
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def on_sighup() -> None:
            async def reload() -> None:
                service_log.info("SIGHUP: reloading", extra={"event": "sighup"})
                # Each worker gets the signal: the change is made here only.
                kind = "sync" if settings.model_repository is not None else "file"
                await registry.apply(Action(kind, str(settings.model_path)))

            reloads.add(task := loop.create_task(reload()))
            task.add_done_callback(reloads.discard)

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
            if link is not None:
                link.detach()
            await grpc_v2.stop(grpc_server)
            await shadows.close()
            await registry.close()
            executor.shutdown(wait=True)

    app = FastAPI(
        title="MMoE ranking service",
        version="1",
        description="Per-candidate, per-task scores from one self-contained ONNX model.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.router.routes.append(predict.route(app.state))
    for router in (health.router, kserve.router, admin.router):
        app.include_router(router)

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            registry: ModelRegistry | None = getattr(app.state, "registry", None)
            model = registry.default_model() if registry is not None else None
            body = model.decoder.json_schema() if model is not None else None
            app.openapi_schema = openapi.document(app, body)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
    app.add_middleware(Observability, metrics=metrics, access_log=settings.access_log, share=share)
    return app


# After SIGTERM, how long each worker lets its in-flight requests finish (deploy/ sizes the
# containers' grace periods on it).
GRACEFUL_SHUTDOWN_S = 30


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """How uvicorn serves the app: request heads bounded in size and time (service/protocol.py),
    logging left to ours, up to GRACEFUL_SHUTDOWN_S for in-flight requests after SIGTERM."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
        http=bounded_http_protocol(settings.client_timeout_s),
    )
