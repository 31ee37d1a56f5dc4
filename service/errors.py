"""Errors are part of the interface: every 4xx names the field and the reason."""

from __future__ import annotations

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error answered as `{"error": {"code", "field", "reason"}}` with `status`."""

    def __init__(
        self,
        status: int,
        code: str,
        reason: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.status = status
        self.code = code
        self.reason = reason
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"code": self.code, "field": self.field, "reason": self.reason}}


class PayloadError(ApiError):
    """The request body cannot be scored as sent (422 unless said otherwise)."""

    def __init__(
        self, field: str | None, reason: str, status: int = 422, code: str = "invalid_request"
    ):
        super().__init__(status, code, reason, field)


class InternalError(ApiError):
    """Something failed that no request should make fail (a bug, or a runtime error): a JSON
    500 that gives the request's id, under which the failure is logged."""

    def __init__(self, request_id: str) -> None:
        reason = f"unexpected server error, logged as request {request_id}"
        super().__init__(500, "internal_error", reason)
        self.request_id = request_id

    def body(self) -> dict[str, dict[str, str | None]]:
        body = super().body()
        body["error"]["request_id"] = self.request_id
        return body


def error_response(err: ApiError) -> Response:
    return Response(
        orjson.dumps(err.body()),
        status_code=err.status,
        media_type="application/json",
        headers=err.headers,
    )


async def api_error_handler(request: Request, err: Exception) -> Response:
    assert isinstance(err, ApiError)
    return error_response(err)


async def http_error_handler(request: Request, err: Exception) -> Response:
    assert isinstance(err, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return error_response(
        ApiError(err.status_code, code, str(err.detail), None, dict(err.headers or {}))
    )


async def validation_error_handler(request: Request, err: Exception) -> Response:
    assert isinstance(err, RequestValidationError)
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    field = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return error_response(ApiError(422, "invalid_request", str(first["msg"]), field))
