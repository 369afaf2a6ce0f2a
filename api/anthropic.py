"""The Anthropic Messages routes: `POST /v1/messages` (streamed or whole) and
`POST /v1/messages/count_tokens`, over the same chat service as the OpenAI routes.

A stream is, in order (each frame with its `event:` line, which Claude Code requires):

    message_start
    per block: content_block_start, content_block_delta..., content_block_stop
               (text: text_delta; thinking: thinking_delta; tool_use: input_json_delta)
    message_delta (stop_reason, usage)   message_stop
    ping whenever the stream has been silent for `ping_interval` (a long prefill);
    error, in place of the end, if the engine fails.

Usage follows Anthropic: `input_tokens` excludes the tokens served from the prefix cache,
which are `cache_read_input_tokens`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, suppress
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from shoal.api.anthropic_protocol import (MessagesRequest, chat_prompt, forced_tool, parse_tools,
                                          prompt_too_long, sampling_params)
from shoal.api.auth import require_api_key
from shoal.api.body import parse_body
from shoal.api.structured import compiled
from shoal.api.chat import ChatDelta, ChatFinish, ChatResult, ChatRun
from shoal.api.output_parser import Segment, SegmentKind
from shoal.api.request_id import new_request_id
from shoal.api.serving import engine_failure, engine_unavailable, json_response, serve, start
from shoal.api.sse import named_event
from shoal.api.state import ServerState, server_state
from shoal.engine.outputs import RequestOutput

router = APIRouter(dependencies=[Depends(require_api_key)])

STOP_REASONS = {ChatFinish.STOP: "end_turn", ChatFinish.STOP_SEQUENCE: "stop_sequence",
                ChatFinish.LENGTH: "max_tokens", ChatFinish.TOOL_CALLS: "tool_use"}
PING = named_event("ping", {"type": "ping"})


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    server = server_state(request)
    req = await parse_body(request, MessagesRequest, server.config.max_request_bytes)
    model = _check(server, req)
    conversation = chat_prompt(req)
    prompt = await server.chat.render(conversation)
    forced, name = forced_tool(req)
    structured = await compiled(server.engine, server.chat.forced_call(conversation.tools, name, prompt)
                                if forced else None)
    params = sampling_params(req, len(prompt), server.engine.info.max_model_len,
                             server.sampling_defaults, structured)
    request_id = new_request_id(request.state.request_id)
    # Tool parsers look argument types up in OpenAI-shaped tools (function.parameters).
    run = start(lambda: server.chat.start(prompt, [params], request_id, None,
                                          conversation.tools, parse_tools(req)), "messages")
    message = MessageWriter(f"msg_{request_id.replace('-', '')}", model, len(prompt))
    return await serve(request, run, req.stream,
                       events=lambda r: stream_events(r, message, server.config.ping_interval),
                       whole=lambda results: message.whole(results[0]))


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    server = server_state(request)
    req = await parse_body(request, MessagesRequest, server.config.max_request_bytes)
    _check(server, req)
    prompt = await server.chat.render(chat_prompt(req))
    return json_response({"input_tokens": len(prompt)})


def _check(server: ServerState, req: MessagesRequest) -> str:
    model = server.model.resolve(req.model, accept_claude=True)
    if not server.engine.is_alive:
        raise engine_unavailable()
    return model


class MessageWriter:
    """One response message: its whole JSON body, or its stream events block by block."""

    def __init__(self, message_id: str, model: str, num_prompt_tokens: int):
        self.id = message_id
        self.model = model
        self.num_prompt_tokens = num_prompt_tokens
        self.num_blocks = 0
        self.open_kind: SegmentKind | None = None  # the kind of the block being streamed

    def envelope(self, content: list[dict], stop_reason: str | None, stop_sequence: str | None,
                 usage: dict) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": usage}

    def whole(self, result: ChatResult) -> dict:
        content = [block_json(seg, full=True) for seg in result.segments]
        return self.envelope(content, *stop_fields(result.final, result.finish), usage(result.final))

    def start(self) -> bytes:
        # The cache split is known only once the request is scheduled: message_start counts
        # the whole prompt as input, message_delta (which the SDKs take as final) splits it.
        opening = self.envelope([], None, None, {"input_tokens": self.num_prompt_tokens,
                                                 "output_tokens": 0})
        return named_event("message_start", {"type": "message_start", "message": opening})

    def segments(self, segments: tuple[Segment, ...]) -> list[bytes]:
        frames: list[bytes] = []
        for seg in segments:
            if seg.kind is not self.open_kind or seg.kind is SegmentKind.TOOL_CALL:
                frames += self._close()
                frames.append(self._event("content_block_start", content_block=block_json(seg, full=False)))
                self.open_kind = seg.kind
            frames.append(self._event("content_block_delta", delta=delta_json(seg)))
        return frames

    def end(self, delta: ChatDelta) -> list[bytes]:
        stop_reason, stop_sequence = stop_fields(delta.output, delta.finish)
        return [*self._close(),
                named_event("message_delta", {"type": "message_delta", "usage": usage(delta.output),
                                              "delta": {"stop_reason": stop_reason,
                                                        "stop_sequence": stop_sequence}}),
                named_event("message_stop", {"type": "message_stop"})]

    def _close(self) -> list[bytes]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        self.num_blocks += 1
        return [named_event("content_block_stop", {"type": "content_block_stop",
                                                   "index": self.num_blocks - 1})]

    def _event(self, name: str, **fields: Any) -> bytes:
        return named_event(name, {"type": name, "index": self.num_blocks, **fields})


def block_json(seg: Segment, full: bool) -> dict:
    """A content block: whole (`full`), or as it opens a stream (empty, filled by deltas;
    Claude Code reads tool input only from `input_json_delta`)."""
    if seg.kind is SegmentKind.TOOL_CALL:
        call = seg.call
        return {"type": "tool_use", "id": f"toolu_{call.id}", "name": call.name,
                "input": orjson.loads(call.arguments) if full else {}}
    if seg.kind is SegmentKind.REASONING:
        return {"type": "thinking", "thinking": seg.text if full else "", "signature": ""}
    return {"type": "text", "text": seg.text if full else ""}


def delta_json(seg: Segment) -> dict:
    if seg.kind is SegmentKind.TOOL_CALL:
        return {"type": "input_json_delta", "partial_json": seg.call.arguments}
    if seg.kind is SegmentKind.REASONING:
        return {"type": "thinking_delta", "thinking": seg.text}
    return {"type": "text_delta", "text": seg.text}


def stop_fields(output: RequestOutput | None, finish: ChatFinish | None) -> tuple[str | None, str | None]:
    reason = STOP_REASONS.get(finish) if finish is not None else None
    sequence = output.stop_reason if finish is ChatFinish.STOP_SEQUENCE else None
    return reason, sequence


def usage(output: RequestOutput | None) -> dict:
    if output is None:
        return {"input_tokens": 0, "output_tokens": 0}
    cached = output.num_cached_tokens
    return {"input_tokens": output.num_prompt_tokens - cached, "output_tokens": output.num_output_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


async def stream_events(run: ChatRun, message: MessageWriter, ping_interval: float) -> AsyncGenerator[bytes, None]:
    """A ping goes out after `ping_interval` without a frame: while the engine is silent
    (prefill) and while the parser holds a long tool call back."""
    yield message.start()
    last_frame = time.monotonic()
    async with aclosing(run.deltas()) as deltas, aclosing(with_pings(deltas, ping_interval)) as items:
        async for delta in items:
            if delta is not None and delta.output.error is not None:
                error = engine_failure(run.engine, delta.output.error)
                yield named_event("error", error.anthropic_body())
                return
            frames = [] if delta is None else message.segments(delta.segments)
            if delta is not None and delta.output.finished:
                frames += message.end(delta)
            if not frames and time.monotonic() - last_frame >= ping_interval:
                frames = [PING]
            for frame in frames:
                yield frame
            if frames:
                last_frame = time.monotonic()


async def with_pings(deltas: AsyncIterator[ChatDelta], interval: float) -> AsyncGenerator[ChatDelta | None, None]:
    """`deltas`, with a None after every `interval` seconds of silence. The pending read
    is never cancelled by a timeout (that would end the stream), only when we are closed."""
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(deltas))
            done, _ = await asyncio.wait((pending,), timeout=interval)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
