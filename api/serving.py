"""Running one generation request against the engine and answering it, streamed or whole.

Disconnects abort the engine requests in both modes:
- streamed: Starlette cancels the body iterator; `EventStreamResponse` then aborts.
- whole: Starlette does not cancel a plain handler when the client leaves, so the work is
  raced against the connection's `http.disconnect` and cancelled if that comes first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

import orjson
from fastapi import Request
from starlette.responses import Response

from shoal.api.choices import ChoiceResult, ChoiceStreams
from shoal.api.errors import APIError, bad_request
from shoal.api.render import Renderer, usage
from shoal.api.sse import DONE, EventStreamResponse, event
from shoal.engine.async_engine import AsyncEngine, EngineDeadError
from shoal.engine.sampling_params import SamplingParams

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for "client closed request"; never reaches the client


@dataclass(frozen=True)
class Generation:
    """A validated request, ready for the engine: n choices per prompt."""

    request_id: str
    prompts: Sequence[list[int]]
    params: Sequence[Sequence[SamplingParams]]
    stream: bool
    include_usage: bool
    prompt_param: str  # the field to blame if the engine refuses a prompt
    cache_salt: str | None = None


async def serve(request: Request, engine: AsyncEngine, gen: Generation, renderer: Renderer) -> Response:
    choices = start(engine, gen)
    if gen.stream:
        events = stream_events(engine, choices, renderer, gen.include_usage)
        return EventStreamResponse(events, on_close=choices.abort)
    results = await unless_disconnected(request, collect(choices), on_disconnect=choices.abort)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    return json_response(renderer.response(results, usage([r.final for r in results], choices.n)))


def start(engine: AsyncEngine, gen: Generation) -> ChoiceStreams:
    try:
        return ChoiceStreams.start(engine, gen.prompts, gen.params, gen.request_id, gen.cache_salt)
    except EngineDeadError:
        raise engine_unavailable() from None
    except ValueError as exc:
        raise bad_request(str(exc), gen.prompt_param) from None


async def collect(choices: ChoiceStreams) -> list[ChoiceResult]:
    """Every choice folded whole; raises if the engine failed any of them."""
    results = [ChoiceResult() for _ in choices.streams]
    async with aclosing(choices.deltas()) as deltas:
        async for delta in deltas:
            results[delta.index].add(delta.output)
            if delta.output.error is not None:
                raise engine_failure(choices.engine, delta.output.error)
    return results


async def stream_events(engine: AsyncEngine, choices: ChoiceStreams, renderer: Renderer,
                        include_usage: bool) -> AsyncGenerator[bytes, None]:
    """SSE frames: openings, one chunk per delta, optional usage chunk, [DONE]. An engine
    error ends the stream with a `data: {"error": ...}` frame."""
    finals = [None] * len(choices.streams)
    for index in range(len(choices.streams)):
        if (opening := renderer.opening(index)) is not None:
            yield event(renderer.chunk([opening]))
    async with aclosing(choices.deltas()) as deltas:
        async for delta in deltas:
            if delta.output.error is not None:
                yield event(engine_failure(engine, delta.output.error).body())
                yield DONE
                return
            if (choice := renderer.delta(delta.index, delta.output)) is not None:
                yield event(renderer.chunk([choice]))
            if delta.output.finished:
                finals[delta.index] = delta.output
    if include_usage:
        yield event(renderer.chunk([], usage(finals, choices.n)))
    yield DONE


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
    if not engine.is_alive:
        return engine_unavailable(message)
    return APIError(500, message)


def engine_unavailable(detail: str | None = None) -> APIError:
    message = "The engine is not running; the server cannot generate."
    return APIError(503, f"{message} ({detail})" if detail else message)


def json_response(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
