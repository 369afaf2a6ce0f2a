"""Server-sent events: `data: {json}\\n\\n` frames, `data: [DONE]`, and a response that
always runs its cleanup, however the stream ends."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: Any) -> bytes:
    """One SSE frame carrying `payload` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response whose `on_close` runs when the stream ends for any
    reason: finished, client gone, or cancelled before the generator even started (in
    which case the generator's own `finally` would never run)."""

    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Callable[[], None],
                 headers: dict[str, str] | None = None):
        super().__init__(events, media_type="text/event-stream", headers={**HEADERS, **(headers or {})})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:
                self._on_close()


def named_event(name: str, payload: Any) -> bytes:
    """One SSE frame with an `event:` line (the Anthropic stream's framing)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
