"""The FastAPI app: create_app(settings) wires settings, metrics, the model holder and routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmoe.service import grpc_v2
from mmoe.service.errors import (
    ApiError,
    api_error_handler,
    http_error_handler,
    validation_error_handler,
)
from mmoe.service.metrics import ServiceMetrics
from mmoe.service.predictor import ModelLoadError, ProviderError, choose_providers
from mmoe.service.routes import admin, health, kserve, predict
from mmoe.service.settings import Settings
from mmoe.service.state import ModelHolder

log = logging.getLogger("mmoe.access")
service_log = logging.getLogger("mmoe.service")
_KNOWN_ROUTES = {"/predict", "/livez", "/readyz", "/metadata", "/metrics", "/admin/reload"}


class Observability:
    """Pure ASGI middleware: request id (echoes x-request-id), latency and status metrics, and a
    JSON access-log line per request."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, access_log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = ""
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                request_id = v.decode("latin-1")[:128]
                break
        request_id = request_id or uuid.uuid4().hex
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        self.metrics.active_requests += 1
        failed = True
        try:
            await self.app(scope, receive, send_wrapper)
            failed = False
        finally:
            self.metrics.active_requests -= 1
            if not status:  # no answer: an error (500 from the outer middleware) or the client left
                status = 500 if failed else 499
            elapsed = time.perf_counter() - start
            path = scope["path"]
            route = scope.get("route")
            label = getattr(route, "path", None) or (path if path in _KNOWN_ROUTES else "other")
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(elapsed)
            if self.access_log and path not in ("/livez", "/readyz", "/metrics"):
                log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": path,
                        "status": status,
                        "ms": round(elapsed * 1000, 3),
                        "client": (scope.get("client") or ("", 0))[0],
                    },
                )


def _custom_openapi(app: FastAPI) -> dict[str, Any]:
    """OpenAPI with the /predict body generated from the loaded model's features."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    holder: ModelHolder = app.state.holder
    model = holder.current
    body: dict[str, Any] | None = None
    if model is not None:
        body = model.decoder.json_schema()
        defs = body.pop("$defs", {})
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs)
        body = _rewrite_refs(body)
        schema["components"]["schemas"] = _rewrite_refs(schema["components"]["schemas"])
    # /predict is served outside FastAPI's routing (predict.PredictEndpoint): documented here.
    schema["paths"] = {"/predict": {"post": predict.openapi_operation(body)}, **schema["paths"]}
    # Other msgspec-documented bodies (reload, KServe infer) carry their own $defs; OpenAPI
    # resolves a $ref against the whole document, so they move to components too.
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for item in schema["paths"].values():
        for operation in item.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                components.update(_rewrite_refs(media["schema"].pop("$defs", {})))
                media["schema"] = _rewrite_refs(media["schema"])
    app.openapi_schema = schema
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


def _stop_if_failed(loader: asyncio.Task[None]) -> None:
    """The start-up loader only ends by loading a model, being cancelled at shutdown, or hitting
    something retrying cannot fix (ProviderError): then stop the server rather than sit unready."""
    if loader.cancelled() or loader.exception() is None:
        return
    service_log.critical(f"cannot serve: {loader.exception()}", extra={"event": "model_load_fatal"})
    signal.raise_signal(signal.SIGTERM)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServiceMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            choose_providers(settings.provider)
        except ProviderError as err:  # a setting to fix: fail the start (non-zero exit)
            service_log.critical(f"cannot serve: {err}", extra={"event": "provider_unavailable"})
            raise
        executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="onnxruntime")
        holder = ModelHolder(settings, metrics, executor)
        holder.on_swap.append(lambda _: setattr(app, "openapi_schema", None))
        app.state.holder = holder
        grpc_server = await grpc_v2.start(settings, holder, metrics)  # None unless configured
        loader = asyncio.create_task(holder.keep_loading())
        loader.add_done_callback(_stop_if_failed)
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def on_sighup() -> None:
            async def reload() -> None:
                service_log.info("SIGHUP: reloading", extra={"event": "sighup"})
                with contextlib.suppress(ModelLoadError):
                    await holder.load(settings.model_path)

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
            await grpc_v2.stop(grpc_server)
            await holder.close()
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
    for router in (health.router, kserve.router, admin.router):
        app.include_router(router)
    app.openapi = lambda: _custom_openapi(app)  # type: ignore[method-assign]
    app.add_middleware(predict.PredictEndpoint, state=app.state)  # inside Observability
    app.add_middleware(Observability, metrics=metrics, access_log=settings.access_log)
    return app
