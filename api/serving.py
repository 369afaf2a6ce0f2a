"""Answering one generation request, streamed or whole, whatever the API surface.

Disconnects abort the engine requests in both modes:
- streamed: Starlette cancels the body iterator; `EventStreamResponse` then aborts.
- whole: Starlette does not cancel a plain handler when the client leaves, so the work is
  raced against the connection's `http.disconnect` and cancelled if that comes first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

import orjson
from fastapi import Request
from starlette.responses import Response

from shoal.api.errors import APIError, bad_request
from shoal.api.sse import EventStreamResponse
from shoal.engine.async_engine import AsyncEngine, EngineDeadError, EngineDrainingError, EngineOverloadedError

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for "client closed request"; never reaches the client


class Run(Protocol):
    """What `serve` drives: the engine requests behind one API request (`ChoiceStreams`
    for completions, `ChatRun` for chat)."""

    engine: AsyncEngine
    n: int
    num_choices: int

    def deltas(self) -> AsyncGenerator[Any, None]: ...
    def abort(self) -> None: ...
    def new_result(self) -> Any: ...


async def serve(request: Request, run: Run, stream: bool,
                events: Callable[[Run], AsyncGenerator[bytes, None]],
                whole: Callable[[list[Any]], dict]) -> Response:
    """The response for a started run: `events(run)` as SSE, or `whole(results)` as JSON
    once every choice has finished. Disconnects abort the run either way."""
    if stream:
        return EventStreamResponse(events(run), on_close=run.abort)
    results = await unless_disconnected(request, collect(run), on_disconnect=run.abort)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    return json_response(whole(results))


def start(fn: Callable[[], T], prompt_param: str) -> T:
    """Queue engine requests with `fn`, turning the engine's refusals into API errors."""
    try:
        return fn()
    except EngineDrainingError as exc:  # this connection should not be reused
        raise APIError(503, f"{exc}.", headers={"connection": "close"}) from None
    except EngineDeadError as exc:
        raise engine_unavailable(str(exc)) from None
    except EngineOverloadedError as exc:
        raise overloaded(str(exc)) from None
    except ValueError as exc:
        raise bad_request(str(exc), prompt_param) from None


async def collect(run: Run) -> list[Any]:
    """Every choice folded whole; raises if the engine failed any of them."""
    results = [run.new_result() for _ in range(run.num_choices)]
    async with aclosing(run.deltas()) as deltas:
        async for delta in deltas:
            results[delta.index].add(delta)
            if delta.output.error is not None:
                raise engine_failure(run.engine, delta.output.error)
    return results


async def unless_disconnected(request: Request, work: Awaitable[T],
                              on_disconnect: Callable[[], None]) -> T | None:
    """`work`'s result, or None (work cancelled, `on_disconnect` called) if the client
    disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            on_disconnect()
    return task.result() if not task.cancelled() else None


async def wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the next message on this connection is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def engine_failure(engine: AsyncEngine, message: str) -> APIError:
    """500 for one request's failure; 503 when the engine is dead or draining for shutdown."""
    if not engine.is_alive or engine.draining:
        return engine_unavailable(message)
    return APIError(500, message)


def engine_unavailable(detail: str | None = None) -> APIError:
    message = "The engine is not running; the server cannot generate."
    return APIError(503, f"{message} ({detail})" if detail else message)


def overloaded(detail: str) -> APIError:
    """429 (OpenAI's rate limit); the Anthropic surface renders it as 529 overloaded_error."""
    return APIError(429, f"The server is overloaded: {detail}.", headers={"retry-after": "1"})


def json_response(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
