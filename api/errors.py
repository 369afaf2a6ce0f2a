"""Errors, each in the shape of the API the client speaks.

Every failure a client can cause is raised as one surface-neutral `APIError` (status,
message, the field to blame) and rendered by one handler, which picks the shape from the
path: Anthropic's `{"type": "error", "error": {"type", "message"}}` under `/v1/messages`,
OpenAI's `{"error": {"message", "type", "param", "code"}}` everywhere else (`code` carries
the HTTP status, as vLLM does). FastAPI's own 422 dumps and Starlette's plain-text 404/405
go through the same handler.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

log = logging.getLogger("shoal")

# The `type` field per status, in the OpenAI SDK's exception names.
ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
# Anthropic's error types per status (its SDK maps them to exception classes).
ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 503: "overloaded_error", 529: "overloaded_error",
}
ANTHROPIC_PATH = "/v1/messages"


class APIError(Exception):
    """A request failure with its HTTP status and the field to blame (if any)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers
        self.code = code  # OpenAI's string code (e.g. context_length_exceeded); None: the status

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def anthropic_body(self) -> dict:
        return anthropic_error_body(self.status, self.message)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error object for a status, message and parameter."""
    error_type = ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": error_type, "param": param,
                      "code": status if code is None else code}}


def anthropic_error_body(status: int, message: str) -> dict:
    error_type = ANTHROPIC_ERROR_TYPES.get(status) or (
        "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": error_type, "message": message}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", "model")


def context_length_exceeded(max_model_len: int, num_prompt: int, max_tokens: int) -> APIError:
    """vLLM's exact wording, so clients that parse it (to trim and retry) keep working."""
    return APIError(400, (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{max_tokens} output tokens and your prompt contains at least {num_prompt} input tokens, "
        f"for a total of at least {num_prompt + max_tokens} tokens. Please reduce the length of "
        "the input prompt or the number of requested output tokens."), "input_tokens")


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic error as a 400 that names the field, e.g. `messages[0].role`."""
    first = exc.errors()[0]
    param = format_loc(tuple(p for p in first["loc"] if p != "body"))
    if first["type"] == "missing":
        return bad_request(f"Missing required field `{param}`.", param)
    # "... a valid dictionary or instance of StreamOptions": our class names mean nothing to clients.
    message = re.sub(r" or instance of \w+", "", first["msg"].removeprefix("Value error, "))
    return bad_request(f"Invalid value for `{param}`: {message}", param or None)


def format_loc(loc: tuple[str | int, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None, anthropic: bool = False,
                   code: str | None = None) -> Response:
    if anthropic and status == 429:  # Shoal's one 429 is overload: Anthropic says 529 for that
        status = 529
    body = anthropic_error_body(status, message) if anthropic else error_body(status, message, param, code)
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def is_anthropic(request: Request) -> bool:
    return request.url.path.startswith(ANTHROPIC_PATH)


async def _api_error(request: Request, exc: APIError) -> Response:
    return error_response(exc.status, exc.message, exc.param, exc.headers, is_anthropic(request), exc.code)


async def _request_validation(request: Request, exc: RequestValidationError) -> Response:
    err = validation_error(exc)
    return error_response(err.status, err.message, err.param, anthropic=is_anthropic(request))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers,
                          anthropic=is_anthropic(request))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal server error: {type(exc).__name__}",
                          anthropic=is_anthropic(request))


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise into its API's error shape."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
