"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``type`` names the class the official Python client raises for the status
(BadRequestError, AuthenticationError, NotFoundError, ...) and ``code`` is the
HTTP status, as vLLM does. FastAPI's own 422 for a body that fails validation
becomes a 400 in this shape.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class OpenAIError(Exception):
    """Raised by handlers; rendered as an OpenAI error response."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def to_response(self) -> ErrorResponse:
        return error_response(self.status, self.message, self.param)


def error_response(status: int, message: str, param: str | None = None) -> ErrorResponse:
    err_type = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=status))


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param)


def from_value_error(err: ValueError, default_param: str | None = None) -> OpenAIError:
    """A ValueError from the engine or SamplingParams (which may carry ``.param``)."""
    return OpenAIError(400, str(err), getattr(err, "param", None) or default_param)


def _json(err: ErrorResponse, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.model_dump(), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    # A field name is the param; a bare index (e.g. JSON that does not parse) is not.
    param = loc[0] if loc and isinstance(loc[0], str) else None
    where = ".".join(str(p) for p in loc) if param else ""
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "JSON decode error")
        return f"the body is not valid JSON: {reason}", None
    message = first.get("msg", "invalid value")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    return (f"{where}: {message}" if where else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _json(exc.to_response(), exc.status, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _json(error_response(400, message, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json(error_response(exc.status_code, str(exc.detail)), exc.status_code,
                     getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return _json(error_response(500, f"internal error: {type(exc).__name__}: {exc}"), 500)
