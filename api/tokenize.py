"""vLLM's /tokenize and /detokenize."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from shoal.api.auth import require_api_key
from shoal.api.body import parse_body
from shoal.api.errors import bad_request
from shoal.api.chat import ChatPrompt
from shoal.api.prompts import check_token_ids, encode
from shoal.api.protocol import DetokenizeRequest, TokenizeRequest
from shoal.api.serving import json_response
from shoal.api.state import ServerState, server_state

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    """`{"prompt": ...}` or `{"messages": [...]}` -> `{"count", "max_model_len", "tokens",
    "token_strs"}`."""
    server = server_state(request)
    req = await parse_body(request, TokenizeRequest, server.config.max_request_bytes)
    server.model.resolve(req.model)
    tokenizer = server.engine.tokenizer
    tokens = await _tokens(server, req)
    token_strs = await asyncio.to_thread(tokenizer.convert_ids_to_tokens, tokens) if req.return_token_strs else None
    return json_response({"count": len(tokens), "max_model_len": server.model.max_model_len,
                          "tokens": tokens, "token_strs": token_strs})


async def _tokens(server: ServerState, req: TokenizeRequest) -> list[int]:
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Send exactly one of `prompt` or `messages`.", "prompt")
    if req.messages is not None:
        if not req.messages:
            raise bad_request("`messages` must not be empty.", "messages")
        prompt = ChatPrompt([m.template_dict() for m in req.messages], req.tools,
                            dict(req.chat_template_kwargs or {}), req.add_generation_prompt)
        return await server.chat.render(prompt)
    add_special = True if req.add_special_tokens is None else req.add_special_tokens
    return await asyncio.to_thread(encode, server.engine.tokenizer, req.prompt, add_special)


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    """`{"tokens": [...]}` -> `{"prompt": text}`."""
    server = server_state(request)
    req = await parse_body(request, DetokenizeRequest, server.config.max_request_bytes)
    server.model.resolve(req.model)
    check_token_ids(req.tokens, server.engine.info.vocab_size, "tokens")
    text = await asyncio.to_thread(server.engine.tokenizer.decode, req.tokens)
    return json_response({"prompt": text})
