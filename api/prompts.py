"""Request text -> prompt token ids: chat messages through the model's chat template,
completion prompts through the tokenizer (or taken as ids)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.api.errors import bad_request
from shoal.api.protocol import ChatMessage


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str | None  # the prompt as sent; None when it came as token ids


def chat_prompt(tokenizer: Any, messages: list[ChatMessage], tools: list[dict] | None = None,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered by the model's chat template."""
    if not getattr(tokenizer, "has_chat_template", True):
        raise bad_request("This model has no chat template; use /v1/completions.", "messages")
    rendered = [m.template_dict() for m in messages]
    try:
        ids = tokenizer.apply_chat_template(rendered, tools=tools,
                                            add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raises anything the template raises
        raise bad_request(f"The chat template rejected the messages: {exc}", "messages") from None
    if isinstance(ids, dict):  # some transformers versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def completion_prompts(tokenizer: Any, prompt: str | list, vocab_size: int) -> list[Prompt]:
    """One Prompt per entry of a (validated) completions `prompt` field."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        prompt = [prompt]
    prompts = [_one_prompt(tokenizer, p) for p in prompt]
    if any(not p.token_ids for p in prompts):
        raise bad_request("The prompt is empty.", "prompt")
    check_token_ids([t for p in prompts for t in p.token_ids], vocab_size, "prompt")
    return prompts


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is out of range [0, {vocab_size}).", param)


def _one_prompt(tokenizer: Any, prompt: str | list[int]) -> Prompt:
    if isinstance(prompt, str):
        return Prompt(list(tokenizer.encode(prompt)), prompt)
    return Prompt(list(prompt), None)


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
