"""Shared things routes depend on, taken from the app (so tests can build apps side by side)."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import Request
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from mmoe.service.batching import Feeds, Outputs, Overloaded
from mmoe.service.errors import ApiError, PayloadError
from mmoe.service.metrics import ServiceMetrics
from mmoe.service.settings import Settings
from mmoe.service.state import LoadedModel, ModelHolder

# Routes call these with their request instead of declaring them with Depends(): FastAPI runs a
# plain-def dependency in its thread pool, a thread hop per request.


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_holder(request: Request) -> ModelHolder:
    holder: ModelHolder = request.app.state.holder
    return holder


def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


def check_api_key(settings: Settings, headers: Headers) -> None:
    """With MMOE_API_KEY set: `Authorization: Bearer <key>` or `x-api-key: <key>` (checked in
    constant time)."""
    expected = settings.api_key
    if expected is None:
        return
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.get_secret_value().encode()
    ):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong API key (Authorization: Bearer or x-api-key)",
            None,
            {"WWW-Authenticate": "Bearer"},
        )


async def require_api_key(request: Request) -> None:
    """check_api_key as a route dependency. Async although it awaits nothing: FastAPI runs a
    plain-def dependency in its thread pool, a thread hop on every request."""
    check_api_key(get_settings(request), request.headers)


async def read_body(
    headers: Headers,
    receive: Receive,
    limit: int,
    timeout_s: float,
    also_allowed: tuple[str, ...] = (),
) -> bytes:
    """The request body, refused with 413 past `limit` bytes (without reading it all), 408 when
    not received within `timeout_s`, and 415 unless it is declared as JSON (or one of
    `also_allowed`); no content-type means JSON. Raises ClientDisconnect if the client leaves."""
    ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json") and ctype not in also_allowed:
        raise PayloadError(
            "content-type",
            f"expected application/json, got {ctype!r}",
            415,
            "unsupported_media_type",
        )
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadError(
            None, f"body of {declared} bytes is over the {limit}-byte limit", 413, "body_too_large"
        )
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):  # a stalled upload must not hold the connection
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadError(
                        None, f"body is over the {limit}-byte limit", 413, "body_too_large"
                    )
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise PayloadError(
            None, f"body not received within {timeout_s:g} s", 408, "request_timeout"
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_json_body(request: Request, limit: int, also_allowed: tuple[str, ...] = ()) -> bytes:
    """read_body for a route."""
    timeout = get_settings(request).client_timeout_s
    return await read_body(request.headers, request.receive, limit, timeout, also_allowed)


async def infer(
    settings: Settings, metrics: ServiceMetrics, model: LoadedModel, feeds: Feeds, n: int
) -> Outputs:
    """Through the model's runner, bounded by the queue and the request timeout (503 when shed)."""
    retry = {"Retry-After": str(settings.retry_after_s)}
    metrics.request_rows.observe(n)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.request_timeout_ms / 1000
    try:
        async with asyncio.timeout_at(deadline):
            outputs = await model.runner.infer(feeds, n)
        if loop.time() > deadline:  # a run on the loop's own thread cannot be interrupted
            raise TimeoutError
        return outputs
    except Overloaded:
        metrics.shed.labels("queue_full").inc()
        raise ApiError(
            503, "overloaded", "server busy: queue full, retry later", None, retry
        ) from None
    except TimeoutError:
        metrics.shed.labels("timeout").inc()
        raise ApiError(
            503,
            "timeout",
            f"not scored within {settings.request_timeout_ms} ms, retry later",
            None,
            retry,
        ) from None


async def run_inference(request: Request, model: LoadedModel, feeds: Feeds, n: int) -> Outputs:
    """infer for a route."""
    return await infer(get_settings(request), get_metrics(request), model, feeds, n)
