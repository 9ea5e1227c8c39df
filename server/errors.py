"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a 4xx status."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.tokenizers.tokenizer import replace_lone_surrogates

logger = logging.getLogger(__name__)
# Characters of a refusal's reason in the log at most (a reason may quote a name the client sent).
MAX_LOGGED_REASON = 300
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-\w+\[.*\])$")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def utf8_safe(text: str) -> str:
    """Text that encodes as UTF-8: a lone UTF-16 surrogate (JSON's "\\ud800", from a client or a
    model's tool call) becomes U+FFFD. Every JSON body and event the server writes goes through
    this (O(1) for ASCII text)."""
    return text if text.isascii() else replace_lone_surrogates(text)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": utf8_safe(message), "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if first.get("type") == "missing" and not loc:
        return "The request body is missing.", None
    # The top-level field is the param; pydantic names union members (`str`, `list[int]`) in
    # the path, which says nothing to a client.
    param = loc[0] if loc else None
    path = ".".join(part for part in loc if not _UNION_MEMBER.match(part))
    if first.get("type") == "extra_forbidden":  # OpenAI's words for an argument it does not know
        return f"Unrecognized request argument supplied: {path}", param
    message = first.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return (f"Invalid value for '{path}': {message}" if param else message), param


def _log_refusal(request: Request, status: int, message: str, param: str | None) -> None:
    """A refused request's reason in the log (its request id comes with every line), never its body."""
    shown = message if len(message) <= MAX_LOGGED_REASON else message[:MAX_LOGGED_REASON] + "..."
    logger.info("%s %s refused with %d%s: %s", request.method, request.url.path, status,
                f" (param {param})" if param else "", shown)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        _log_refusal(request, exc.status, exc.message, exc.param)
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        _log_refusal(request, 400, message, param)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception):
        # Details go to the log, never to the client.
        logger.exception("internal error")
        return error_response(500, "The server had an error while processing the request.", "internal_error")


def sse_error(message: str, type: str = "internal_error", code: str | None = None) -> str:
    """An error event inside an already started stream."""
    return f"data: {json.dumps(error_body(message, type, code=code))}\n\n"
