"""Completion prompts -> token ids: through the tokenizer, or taken as ids. (Chat
messages go through the chat service, `chat.py`.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.api.errors import bad_request


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str | None  # the prompt as sent; None when it came as token ids


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
