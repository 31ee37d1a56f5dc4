"""Per request: an id (x-request-id, echoed or made up), latency and status metrics, and a JSON
access-log line."""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmoe.service.metrics import ServiceMetrics

log = logging.getLogger("mmoe.access")
_KNOWN_ROUTES = {"/predict", "/livez", "/readyz", "/metadata", "/metrics", "/admin/reload"}


class Observability:
    """Pure ASGI middleware around the whole app."""

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

        self.metrics.active.inc()
        failed = True
        try:
            await self.app(scope, receive, send_wrapper)
            failed = False
        finally:
            self.metrics.active.dec()
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
