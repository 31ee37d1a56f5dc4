"""The optional API key (MMOE_API_KEY) of /predict, KServe infer and /admin."""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.datastructures import Headers

from mmoe.service.errors import ApiError
from mmoe.service.settings import Settings
from mmoe.service.state import get_settings


def check_api_key(settings: Settings, headers: Headers) -> None:
    """With MMOE_API_KEY set: `Authorization: Bearer <key>` or `x-api-key: <key>` (checked in
    constant time); else 401."""
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
