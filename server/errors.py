"""Typed API errors and the one place they become OpenAI's error envelope.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Errors are raised where they are detected (validation, service, engine) as subclasses of
:class:`APIError`; :func:`install_error_handlers` converts them — and FastAPI's request
validation errors, Starlette's HTTP errors and anything unexpected — into the envelope.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "APIError",
    "AuthenticationError",
    "ClientClosedError",
    "DeadlineExceededError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "error_body",
    "error_headers",
    "error_response",
    "install_error_handlers",
]

log = logging.getLogger("softspec.server")


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    retry_after: float | None = None  # seconds; sent as the Retry-After header

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidRequestError(APIError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PayloadTooLargeError(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class OverloadedError(APIError):
    """Every slot is busy and the queue is full: come back after ``retry_after``."""

    status = 429
    type = "overloaded_error"
    code = "queue_full"
    retry_after = 1.0


class ClientClosedError(APIError):
    """The client went away before the answer; its work was cancelled (nginx's 499)."""

    status = 499
    type = "client_closed"
    code = "client_disconnected"


class ModelNotFoundError(APIError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class UpstreamError(APIError):
    """The engine answered with an error we cannot attribute to the request."""

    status = 502
    type = "upstream_error"


class UpstreamUnavailableError(APIError):
    status = 503
    type = "upstream_unavailable"
    code = "engine_unavailable"
    retry_after = 5.0


class UpstreamTimeoutError(APIError):
    status = 504
    type = "upstream_timeout"
    code = "engine_timeout"


class DeadlineExceededError(APIError):
    """The request's overall deadline passed; its upstream work was cancelled."""

    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body, headers=headers)


def error_headers(exc: APIError) -> dict[str, str] | None:
    """``WWW-Authenticate`` on 401, ``Retry-After`` (whole seconds, at least 1) when known."""
    headers: dict[str, str] = {}
    if exc.status == 401:
        headers["www-authenticate"] = "Bearer"
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
    return headers or None


def error_response(exc: APIError) -> JSONResponse:
    """The envelope of ``exc`` with its status and headers (also used outside handlers)."""
    body = error_body(exc.message, exc.type, param=exc.param, code=exc.code)
    return _json(exc.status, body, error_headers(exc))


def _loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the OpenAI error envelope."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _loc(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('msg')}"
            param = None
        elif first.get("type") == "missing":
            message = f"missing required field {param!r}"
        elif first.get("type") == "extra_forbidden":
            message = f"unrecognized request argument {param!r}"
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return _json(400, error_body(message, "invalid_request_error", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return _json(exc.status_code, error_body(message, kind, code=exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json(500, error_body(f"internal error: {type(exc).__name__}", "server_error"))
