"""The OpenAI-compatible routes: chat completions, text completions, models.

Each handler validates in order (body, model, prompt, sampling) so the first problem is
the one reported, then hands a `Generation` and a renderer to `serving.serve`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from shoal.api.auth import require_api_key
from shoal.api.body import parse_body
from shoal.api.errors import bad_request
from shoal.api.prompts import chat_prompt, completion_prompts
from shoal.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from shoal.api.render import ChatRenderer, CompletionRenderer
from shoal.api.request_id import new_request_id
from shoal.api.sampling import chat_logprobs, completion_logprobs, resolve_max_tokens, sampling_params
from shoal.api.serving import Generation, engine_unavailable, json_response, serve
from shoal.api.state import ServerState, server_state

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    server = server_state(request)
    req = await parse_body(request, ChatCompletionRequest, server.config.max_request_bytes)
    model = _check_common(server, req)
    _check_chat_options(req)
    engine = server.engine
    prompt = chat_prompt(engine.tokenizer, req.messages, req.tools, req.add_generation_prompt)
    logprobs = chat_logprobs(req)
    max_tokens = resolve_max_tokens(req.requested_max_tokens, len(prompt), engine.info.max_model_len)
    params = sampling_params(req, max_tokens, logprobs, engine.info.vocab_size)
    request_id = new_request_id(request.state.request_id)
    gen = Generation(request_id, [prompt], [params], req.stream, req.include_usage, "messages", req.cache_salt)
    renderer = ChatRenderer(f"chatcmpl-{request_id}", model, engine.tokenizer, logprobs)
    return await serve(request, engine, gen, renderer)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    server = server_state(request)
    req = await parse_body(request, CompletionRequest, server.config.max_request_bytes)
    model = _check_common(server, req)
    engine = server.engine
    prompts = completion_prompts(engine.tokenizer, req.prompt, engine.info.vocab_size)
    logprobs = completion_logprobs(req)
    params = [sampling_params(req, resolve_max_tokens(req.max_tokens, len(p.token_ids),
                                                      engine.info.max_model_len),
                              logprobs, engine.info.vocab_size) for p in prompts]
    request_id = new_request_id(request.state.request_id)
    gen = Generation(request_id, [p.token_ids for p in prompts], params, req.stream,
                     req.include_usage, "prompt", req.cache_salt)
    renderer = CompletionRenderer(f"cmpl-{request_id}", model, engine.tokenizer, logprobs,
                                  prompts, req.n, req.echo)
    return await serve(request, engine, gen, renderer)


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    return json_response(server_state(request).model.cards())


@router.get("/v1/models/{name:path}")
async def get_model(request: Request, name: str) -> Response:
    model = server_state(request).model
    return json_response(model.card(model.resolve(name)))


def _check_common(server: ServerState, req: SamplingRequest) -> str:
    """The model name to echo; 404 for unknown models, 400 for too many choices, 503 when
    the engine is down (before any tokenizing work)."""
    model = server.model.resolve(req.model)
    if req.n > server.config.max_n:
        raise bad_request(f"n must be at most {server.config.max_n}, got {req.n}.", "n")
    if not server.engine.is_alive:
        raise engine_unavailable()
    return model


def _check_chat_options(req: ChatCompletionRequest) -> None:
    # Refuse what would otherwise be silently ignored: clients rely on these guarantees.
    kind = _field(req.response_format, "type")
    if kind not in (None, "text"):
        raise bad_request(f"response_format type {kind!r} is not supported; only 'text'.",
                          "response_format")
    choice = req.tool_choice if isinstance(req.tool_choice, str) else _field(req.tool_choice, "type")
    if choice not in (None, "none", "auto"):
        raise bad_request("Only tool_choice 'auto' and 'none' are supported.", "tool_choice")


def _field(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, dict) else value
