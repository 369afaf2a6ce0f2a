"""The OpenAI-compatible routes: chat completions, text completions, models.

Each handler validates in order (body, model, prompt, sampling) so the first problem is
the one reported. Chat goes through the surface-neutral chat service; this module only
translates OpenAI's fields in and its chunks out.
"""

from __future__ import annotations

import asyncio

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from shoal.api.auth import require_api_key
from shoal.api.body import parse_body
from shoal.api.chat import ChatPrompt, ChatService
from shoal.api.choices import ChoiceStreams
from shoal.api.errors import bad_request
from shoal.api.structured import compiled, requested_output
from shoal.engine.structured_output import StructuredOutput
from shoal.api.prompts import completion_prompts
from shoal.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from shoal.api.render import ChatRenderer, CompletionRenderer, Renderer, usage
from shoal.api.request_id import new_request_id
from shoal.api.sampling import chat_logprobs, completion_logprobs, resolve_max_tokens, sampling_params
from shoal.api.serving import Run, engine_failure, engine_unavailable, json_response, serve, start
from shoal.api.sse import DONE, event
from shoal.api.state import ServerState, server_state

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    server = server_state(request)
    req = await parse_body(request, ChatCompletionRequest, server.config.max_request_bytes)
    model = _check_common(server, req)
    _check_chat_options(req)
    engine = server.engine
    prompt = await server.chat.render(chat_prompt(req))
    structured = await compiled(engine, chat_output(req, server.chat, prompt))
    logprobs = chat_logprobs(req)
    max_tokens = resolve_max_tokens(req.requested_max_tokens, len(prompt), engine.info.max_model_len)
    params = sampling_params(req, max_tokens, logprobs, engine.info.vocab_size, server.sampling_defaults,
                             structured)
    request_id = new_request_id(request.state.request_id)
    parse_tools = req.tool_choice != "none"
    run = start(lambda: server.chat.start(prompt, params, request_id, req.cache_salt, req.tools,
                                          parse_tools), "messages")
    renderer = ChatRenderer(f"chatcmpl-{request_id}", model, engine.tokenizer, logprobs)
    return await _serve(request, run, renderer, req)


def chat_prompt(req: ChatCompletionRequest) -> ChatPrompt:
    return ChatPrompt([m.template_dict() for m in req.messages], req.tools,
                      dict(req.chat_template_kwargs or {}), req.add_generation_prompt,
                      req.continue_final_message)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    server = server_state(request)
    req = await parse_body(request, CompletionRequest, server.config.max_request_bytes)
    model = _check_common(server, req)
    engine = server.engine
    structured = await compiled(engine, requested_output(req))
    prompts = await asyncio.to_thread(completion_prompts, engine.tokenizer, req.prompt, engine.info.vocab_size)
    logprobs = completion_logprobs(req)
    params = [sampling_params(req, resolve_max_tokens(req.max_tokens, len(p.token_ids),
                                                      engine.info.max_model_len),
                              logprobs, engine.info.vocab_size, server.sampling_defaults, structured)
              for p in prompts]
    request_id = new_request_id(request.state.request_id)
    run = start(lambda: ChoiceStreams.start(engine, [p.token_ids for p in prompts], params,
                                            request_id, req.cache_salt), "prompt")
    renderer = CompletionRenderer(f"cmpl-{request_id}", model, engine.tokenizer, logprobs,
                                  prompts, req.n, req.echo)
    return await _serve(request, run, renderer, req)


async def _serve(request: Request, run: Run, renderer: Renderer, req: SamplingRequest) -> Response:
    return await serve(request, run, req.stream,
                       events=lambda r: stream_events(r, renderer, req.include_usage),
                       whole=lambda results: renderer.response(
                           results, usage([r.final for r in results], run.n)))


async def stream_events(run: Run, renderer: Renderer, include_usage: bool) -> AsyncGenerator[bytes, None]:
    """SSE frames: openings, one chunk per delta, optional usage chunk, [DONE]. An engine
    error ends the stream with a `data: {"error": ...}` frame."""
    finals = [None] * run.num_choices
    for index in range(run.num_choices):
        if (opening := renderer.opening(index)) is not None:
            yield event(renderer.chunk([opening]))
    async with aclosing(run.deltas()) as deltas:
        async for delta in deltas:
            if delta.output.error is not None:
                yield event(engine_failure(run.engine, delta.output.error).body())
                yield DONE
                return
            if (choice := renderer.delta(delta)) is not None:
                yield event(renderer.chunk([choice]))
            if delta.output.finished:
                finals[delta.index] = delta.output
    if include_usage:
        yield event(renderer.chunk([], usage(finals, run.n)))
    yield DONE


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    return json_response(server_state(request).model.cards())


@router.get("/v1/models/{name:path}")
async def get_model(request: Request, name: str) -> Response:
    model = server_state(request).model
    return json_response(model.card(model.resolve(name)))


def _check_common(server: ServerState, req: SamplingRequest) -> str:
    """The model name to echo; 404 for unknown models, 400 for too many choices or fields
    Shoal does not honour, 503 when the engine is down (before any tokenizing work)."""
    model = server.model.resolve(req.model)
    if req.n > server.config.max_n:
        raise bad_request(f"n must be at most {server.config.max_n}, got {req.n}.", "n")
    if unsupported := req.unsupported_fields():
        name, value = unsupported[0]
        raise bad_request(f"`{name}` is not supported by this server (got {value!r:.60}).", name)
    if not server.engine.is_alive:
        raise engine_unavailable()
    return model


def chat_output(req: ChatCompletionRequest, chat: ChatService,
                prompt: list[int]) -> tuple[StructuredOutput, str] | None:
    """The grammar a chat request asks for: response_format / vLLM's fields, or a forced call."""
    found = requested_output(req, req.response_format)
    choice = req.tool_choice
    if choice in (None, "none", "auto"):
        return found
    if choice == "required":
        name = None
    elif (isinstance(choice, dict) and choice.get("type") == "function"
          and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)):
        name = choice["function"]["name"]
    else:
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                          '{"type": "function", "function": {"name": ...}}.', "tool_choice")
    if found is not None:
        raise bad_request(f"A forced tool call cannot be combined with `{found[1]}`.", "tool_choice")
    return chat.forced_call(req.tools, name, prompt)


def _check_chat_options(req: ChatCompletionRequest) -> None:
    if req.continue_final_message and req.messages[-1].role != "assistant":
        raise bad_request("`continue_final_message` needs a final assistant message.",
                          "continue_final_message")


def _field(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, dict) else value
