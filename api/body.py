"""Reading a JSON request body with clear 4xx errors: content type (415), size (413,
checked before and while reading), UTF-8 and JSON (400), then the pydantic model (400)."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from shoal.api.errors import APIError, bad_request, validation_error

ModelT = TypeVar("ModelT", bound=BaseModel)
DRAIN_FACTOR = 4  # an oversized body is read (and dropped) up to this many times the limit


async def parse_body(request: Request, model: type[ModelT], max_bytes: int) -> ModelT:
    """The body as `model`, or an APIError naming what is wrong with it."""
    data = await read_json(request, max_bytes)
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def read_json(request: Request, max_bytes: int) -> Any:
    check_content_type(request.headers.get("content-type"))
    raw = await read_limited(request, max_bytes)
    if not raw.strip():
        raise bad_request("The request body is empty; expected a JSON object.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"The request body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None


def check_content_type(content_type: str | None) -> None:
    # A missing header is tolerated (some clients omit it); a different type is refused.
    if content_type is None:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise APIError(415, f"Unsupported content type {media_type!r}; send application/json.")


async def read_limited(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing (413) once it exceeds `max_bytes`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        await _discard(request, DRAIN_FACTOR * max_bytes)
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            await _discard(request, DRAIN_FACTOR * max_bytes - size)
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


async def _discard(request: Request, budget: int) -> None:
    # Answering before the client has sent its body resets the connection, and the client
    # sees ECONNRESET instead of our 413: swallow a bounded amount of what is in flight.
    async for chunk in request.stream():
        budget -= len(chunk)
        if budget <= 0:
            return


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"The request body exceeds the limit of {max_bytes} bytes.")
