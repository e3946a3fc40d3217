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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class OpenAIError(Exception):
    """Raised by handlers; rendered as an OpenAI error response."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers

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
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return _json(exc.to_response(), exc.status, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _json(error_response(400, message, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json(error_response(exc.status_code, str(exc.detail)), exc.status_code,
                     getattr(exc, "headers", None))

    # Last, so it sits outermost of the middleware: inside Starlette's own
    # error middleware, which would answer a 500 and then re-raise (and the
    # HTTP server would reset the connection).
    app.add_middleware(CatchAll)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes "
                              f"(--max-request-body-bytes)")


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets a 413, at once when
    Content-Length says so, else as soon as the bytes read pass the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            exc = BodyTooLarge(self.limit)
            await _json(error_response(413, exc.detail), 413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class CatchAll:
    """ASGI middleware: an unexpected exception becomes a 500 in OpenAI's
    shape, and the connection stays usable for the client's next request.
    (A response already under way cannot change: it is re-raised.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            logger.exception("unhandled error while serving a request")
            await _json(error_response(500, f"internal error: {type(exc).__name__}: {exc}"),
                        500)(scope, receive, send)
