"""The OpenAI Responses API (`POST /v1/responses`, what Codex speaks), over the same chat
service as chat completions and Anthropic messages; `GET` / `DELETE /v1/responses/{id}`
for stored responses.

Stateless by default as Codex uses it (`store: false`, the whole history resent each turn);
with `store` (OpenAI's default) a finished response is kept in a bounded in-memory store so a
later request can continue it with `previous_response_id`. A prompt over the context window
fails with code `context_length_exceeded`: as a `response.failed` event when streamed (Codex
compacts its history on it), as a 400 otherwise.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from shoal.api.auth import require_api_key
from shoal.api.body import parse_body
from shoal.api.chat import ChatPrompt, ChatResult, ChatRun, ChatService
from shoal.api.errors import APIError, bad_request
from shoal.api.request_id import new_request_id
from shoal.api.response_store import ResponseStore, StoredResponse
from shoal.api.responses_protocol import (ResponsesRequest, chat_messages, input_items, prompt_too_long,
                                          sampling_params, template_kwargs, text_format)
from shoal.api.responses_tools import ResponseTools, ToolChoice, convert_tools, tool_choice
from shoal.api.responses_writer import ResponseWriter
from shoal.api.sampling import SamplingDefaults
from shoal.api.serving import engine_failure, engine_unavailable, json_response, serve, start
from shoal.api.sse import EventStreamResponse
from shoal.api.state import ServerState, server_state
from shoal.api.structured import compiled
from shoal.engine.structured_output import StructuredOutput

router = APIRouter(dependencies=[Depends(require_api_key)])
Keep = Callable[[dict[str, Any]], None]  # what becomes of a finished response's body


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    server = server_state(request)
    req = await parse_body(request, ResponsesRequest, server.config.max_request_bytes)
    req.check()
    model = server.model.resolve(req.model)
    if not server.engine.is_alive:
        raise engine_unavailable()
    store = server.responses
    items, first = conversation(req, store)
    tools = convert_tools(req.tools, store)
    choice = tool_choice(req.tool_choice, tools)
    kwargs = {**template_kwargs(req), **({"enable_thinking": False} if choice.custom else {})}
    prompt = await server.chat.render(ChatPrompt(chat_messages(items, req.instructions, first),
                                                 tools.chat_tools, kwargs))
    request_id = new_request_id(request.state.request_id)
    writer = ResponseWriter(response_base(req, f"resp_{request_id.replace('-', '')}", model,
                                          server.sampling_defaults),
                            tools, choice, req.parallel_tool_calls, server.engine.tokenizer)
    max_model_len = server.engine.info.max_model_len
    if len(prompt) >= max_model_len:
        error = prompt_too_long(len(prompt), max_model_len)
        if not req.stream:
            raise error
        return EventStreamResponse(_frames(writer.start() + writer.failed(error.code, error.message)),
                                   on_close=lambda: None)
    structured = await compiled(server.engine, output_spec(req, choice, tools, server.chat, prompt))
    params = sampling_params(req, len(prompt), max_model_len, server.sampling_defaults, structured)
    run = start(lambda: server.chat.start(prompt, [params], request_id, None, tools.chat_tools,
                                          choice.parse_tools), "input")
    keep = keeper(store, items) if req.store else (lambda body: None)
    return await serve(request, run, req.stream, events=lambda r: stream_events(r, writer, keep),
                       whole=lambda results: whole(results[0], writer, keep))


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: str) -> Response:
    return json_response(stored(server_state(request).responses, response_id).body)


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> Response:
    store = server_state(request).responses
    stored(store, response_id)
    store.delete(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


def stored(store: ResponseStore, response_id: str) -> StoredResponse:
    found = store.get(response_id)
    if found is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", "response_id")
    return found


def keeper(store: ResponseStore, items: list[dict[str, Any]]) -> Keep:
    """Stores a finished response with the conversation it ends, for previous_response_id."""
    return lambda body: store.put(body["id"], StoredResponse(body, (*items, *body["output"])))


def conversation(req: ResponsesRequest, store: ResponseStore) -> tuple[list[dict[str, Any]], int]:
    """The stored conversation `previous_response_id` continues, then this request's input;
    and where this request's own items begin."""
    new = input_items(req.input)
    if req.previous_response_id is None:
        return new, 0
    found = store.get(req.previous_response_id)
    if found is None:
        raise bad_request(f"Previous response with id '{req.previous_response_id}' not found (never "
                          f"stored, or evicted from the last {store.max_size} kept).", "previous_response_id")
    return [*found.items, *new], len(found.items)


def output_spec(req: ResponsesRequest, choice: ToolChoice, tools: ResponseTools, chat: ChatService,
                prompt: list[int]) -> tuple[StructuredOutput, str] | None:
    """The one grammar the output must match: text.format, a forced call, or a forced custom
    tool's own grammar (the whole output is then the tool's input)."""
    found = text_format(req)
    if (choice.forced or choice.custom) and found is not None:
        raise bad_request("A forced tool call cannot be combined with a JSON text.format.", "tool_choice")
    if choice.custom is not None:
        return (choice.custom.grammar, "tool_choice") if choice.custom.grammar else None
    if choice.forced:
        return chat.forced_call(tools.chat_tools, choice.name, prompt)
    return found


def response_base(req: ResponsesRequest, response_id: str, model: str,
                  defaults: SamplingDefaults) -> dict[str, Any]:
    """The response object's fields that echo the request."""
    reasoning = req.reasoning or {}
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "model": model,
        "background": False, "error": None, "incomplete_details": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls, "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id, "prompt_cache_key": req.prompt_cache_key,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": req.safety_identifier,
        "service_tier": "default" if req.service_tier in (None, "auto") else req.service_tier,
        "store": req.store, "temperature": defaults.temperature if req.temperature is None else req.temperature,
        "text": {"format": (req.text or {}).get("format") or {"type": "text"},
                 "verbosity": (req.text or {}).get("verbosity", "medium")},
        "tool_choice": req.tool_choice or "auto", "tools": req.tools or [], "top_logprobs": 0,
        "top_p": defaults.top_p if req.top_p is None else req.top_p, "truncation": "disabled",
        "usage": None, "user": req.user,
    }


async def _frames(frames: list[bytes]) -> AsyncGenerator[bytes, None]:
    for frame in frames:
        yield frame


async def stream_events(run: ChatRun, writer: ResponseWriter, keep: Keep) -> AsyncGenerator[bytes, None]:
    for frame in writer.start():
        yield frame
    async with aclosing(run.deltas()) as deltas:
        async for delta in deltas:
            if delta.output.error is not None:
                error = engine_failure(run.engine, delta.output.error)
                for frame in writer.failed("server_error", error.message, delta.output):
                    yield frame
                return
            frames = writer.segments(delta.segments)
            if delta.output.finished:
                frames += writer.end(delta.output, delta.finish)
            for frame in frames:
                yield frame
    if writer.final is not None and writer.final["status"] != "failed":
        keep(writer.final)


def whole(result: ChatResult, writer: ResponseWriter, keep: Keep) -> dict[str, Any]:
    writer.segments(result.segments)
    writer.end(result.final, result.finish)
    if writer.final["status"] != "failed":
        keep(writer.final)
    return writer.final
