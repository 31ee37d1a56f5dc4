"""Per request: an id (x-request-id, echoed or made up), the model that answered (x-model-name
and x-model-version, and the `model`, `version` labels of its metrics), latency and status
metrics, a JSON access-log line, a place among the server's requests in progress (CpuShare),
and a JSON 500 for an error nothing else answered."""

from __future__ import annotations

import logging
import time
import uuid
from contextvars import ContextVar

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmoe.service.cpu_share import CpuShare
from mmoe.service.errors import InternalError
from mmoe.service.metrics import ServiceMetrics

log = logging.getLogger("mmoe.access")
service_log = logging.getLogger("mmoe.service")

# The id of the request being handled (HTTP or gRPC), for what logs a failure on its behalf.
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
# The scope key under which a route puts the model that answers the request (anything with
# `name` and `version`), once routing has chosen it.
SERVED = "mmoe.served"
_KNOWN_ROUTES = {"/predict", "/livez", "/readyz", "/metadata", "/metrics", "/admin/reload"}


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


async def _send_error(send: Send, err: InternalError) -> None:
    body = orjson.dumps(err.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Observability:
    """Pure ASGI middleware around the whole app."""

    def __init__(
        self, app: ASGIApp, metrics: ServiceMetrics, access_log: bool, share: CpuShare
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.share = share

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = (_header(scope, b"x-request-id") or "")[:128] or uuid.uuid4().hex
        REQUEST_ID.set(request_id)
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
                served = scope.get(SERVED)
                if served is not None:
                    headers.append((b"x-model-name", served.name.encode()))
                    headers.append((b"x-model-version", served.version.encode()))
                message["headers"] = headers
            await send(message)

        self.metrics.active.inc()
        failed = True
        try:
            try:
                with self.share.request():
                    await self.app(scope, receive, send_wrapper)
            except Exception:
                if status:  # the answer has begun: the server can only close the connection
                    raise
                service_log.exception(
                    "request failed",
                    extra={
                        "event": "internal_error",
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "content_length": _header(scope, b"content-length"),
                    },
                )
                await _send_error(send_wrapper, InternalError(request_id))
            failed = False
        finally:
            self.metrics.active.dec()
            if not status:  # no answer: an error (500 from the outer middleware) or the client left
                status = 500 if failed else 499
            elapsed = time.perf_counter() - start
            path = scope["path"]
            route = scope.get("route")
            label = getattr(route, "path", None) or (path if path in _KNOWN_ROUTES else "other")
            served = scope.get(SERVED)
            model = (served.name, served.version) if served is not None else ("", "")
            self.metrics.requests.labels(label, str(status), *model).inc()
            self.metrics.latency.labels(label, *model).observe(elapsed)
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
