"""Shared things routes depend on, taken from the app (so tests can build apps side by side)."""

from __future__ import annotations

import asyncio
import hmac

from fastapi import Request

from service.batching import Feeds, Outputs, Overloaded
from service.errors import ApiError, PayloadError
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.state import LoadedModel, ModelHolder

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


async def require_api_key(request: Request) -> None:
    """With MMOE_API_KEY set: `Authorization: Bearer <key>` or `x-api-key: <key>` (checked in
    constant time). Async although it awaits nothing: FastAPI runs a plain-def dependency in its
    thread pool, a thread hop on every request."""
    expected = get_settings(request).api_key
    if expected is None:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
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


async def read_json_body(request: Request, limit: int, also_allowed: tuple[str, ...] = ()) -> bytes:
    """The request body, refused with 413 past `limit` bytes (without reading it all) and 415
    unless it is declared as JSON (or one of `also_allowed`); no content-type means JSON."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json") and ctype not in also_allowed:
        raise PayloadError(
            "content-type",
            f"expected application/json, got {ctype!r}",
            415,
            "unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadError(
            None, f"body of {declared} bytes is over the {limit}-byte limit", 413, "body_too_large"
        )
    chunks = []
    size = 0
    timeout = get_settings(request).client_timeout_s
    try:
        async with asyncio.timeout(timeout):  # a stalled upload must not hold the connection
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadError(
                        None, f"body is over the {limit}-byte limit", 413, "body_too_large"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise PayloadError(
            None, f"body not received within {timeout:g} s", 408, "request_timeout"
        ) from None
    return b"".join(chunks)


async def run_inference(request: Request, model: LoadedModel, feeds: Feeds, n: int) -> Outputs:
    """Through the model's runner, bounded by the queue and the request timeout (503 when shed)."""
    settings = get_settings(request)
    metrics = get_metrics(request)
    retry = {"Retry-After": str(settings.retry_after_s)}
    metrics.request_rows.observe(n)
    try:
        return await asyncio.wait_for(
            model.runner.infer(feeds, n), settings.request_timeout_ms / 1000
        )
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
