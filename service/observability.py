"""Per request: an id (x-request-id, echoed or made up), latency and status metrics, a JSON
access-log line, the server's count of requests in progress (ServerLoad), and a JSON 500 for
an error nothing else answered."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import MutableSequence
from contextvars import ContextVar

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmoe.service.errors import InternalError
from mmoe.service.metrics import ServiceMetrics

log = logging.getLogger("mmoe.access")
service_log = logging.getLogger("mmoe.service")

# The id of the request being handled (HTTP or gRPC), for what logs a failure on its behalf.
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
_KNOWN_ROUTES = {"/predict", "/livez", "/readyz", "/metadata", "/metrics", "/admin/reload"}


# Another worker counts as busy until it has had no request for this long: between the
# requests of one busy connection it is idle for a client's turnaround, and a call that took
# every core then would share them with that worker's next call (on 2 cores, at concurrency
# 2, the lone-request session cost 6% of the throughput without this wait). A request alone on
# the server leaves its siblings idle for much longer.
QUIET_S = 0.001


class ServerLoad:
    """The requests in progress on the whole server (HTTP and gRPC, from their arrival to their
    answer), for a runtime call to know whether it has the machine to itself.

    Each worker writes, in its slots of an array shared by all workers (service/workers.py),
    how many requests it has in progress and when it last had none: one writer per slot, its
    event loop's thread, so no lock. A single-process server has the array to itself. Requests
    still in the kernel's socket queues are not seen: a worker running a call on its event loop
    reads nothing meanwhile, so the next request on its own connections waits for that call
    whatever threads it has."""

    def __init__(self, slots: MutableSequence[float] | None = None, index: int = 0) -> None:
        # [count of worker 0, ..., count of worker n-1, idle since (worker 0), ...]
        self.slots: MutableSequence[float] = slots if slots is not None else [0.0, 0.0]
        self.workers = len(self.slots) // 2
        self.index = index

    def enter(self) -> None:
        self.slots[self.index] += 1

    def leave(self) -> None:
        if self.slots[self.index] <= 1:  # the time first, so that a reader seeing 0 sees it
            self.slots[self.workers + self.index] = time.monotonic()
        self.slots[self.index] -= 1

    def alone(self) -> bool:
        """Whether the request calling is the only one in progress, server-wide, with every
        other worker quiet for QUIET_S."""
        own, n, slots = self.index, self.workers, self.slots
        if slots[own] > 1:
            return False
        quiet = time.monotonic() - QUIET_S
        return all(slots[i] == 0 and slots[n + i] <= quiet for i in range(n) if i != own)


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
        self, app: ASGIApp, metrics: ServiceMetrics, access_log: bool, load: ServerLoad
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.load = load

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
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        self.metrics.active.inc()
        self.load.enter()
        failed = True
        try:
            try:
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
            self.load.leave()
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
