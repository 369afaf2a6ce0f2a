"""Request bodies of the OpenAI and vLLM endpoints, validated strictly (JSON types, no
string-to-number coercion). Unknown fields are ignored, as OpenAI clients expect.

Union-typed fields (`stop`, `prompt`, message `content`) are checked by hand so a wrong
value gets one readable error instead of one per union member.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STRICT = ConfigDict(strict=True, extra="ignore", frozen=True)
INT32_MAX = 2**31 - 1  # top_k and friends become int32 host arrays in the sampler
SEED_MAX = 2**63 - 1


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class ChatMessage(BaseModel):
    """One message; `content` is a string or text parts (joined with newlines)."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("content")
    @classmethod
    def _text_content(cls, value: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(_is_text_part(p) for p in value):
            return "\n".join(p["text"] for p in value)
        raise ValueError("content must be a string or a list of {\"type\": \"text\", \"text\": ...} "
                         "parts (images and audio are not supported)")

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        # OpenAI: only an assistant message that carries tool calls may leave content out.
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs `content`")
        return self

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (unset optional keys left out)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions (OpenAI names plus vLLM's extras)."""

    model_config = STRICT
    model: str | None = None
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # -1 or 0: off
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Any = Field(None, validate_default=True)  # -> tuple[str, ...]
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = Field(None, min_length=1)  # tenants with different salts share no prefix blocks
    # vLLM's structured output fields (api/structured.py), then fields Shoal does not honour
    # yet: those are refused with a 400, never silently dropped.
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    prompt_logprobs: Any = None
    best_of: Any = None

    def unsupported_fields(self) -> list[tuple[str, Any]]:
        """(name, value) of every field set that this server would otherwise ignore."""
        names = ("prompt_logprobs",)
        out = [(name, getattr(self, name)) for name in names if getattr(self, name) is not None]
        if self.best_of not in (None, 1):
            out.append(("best_of", self.best_of))
        return out

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return tuple(value)
        raise ValueError("stop must be a string or a list of strings")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    """`prompt` is a string, a list of strings, token ids, or a list of token-id lists."""

    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, value: Any) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(value, str) or _is_ids(value):
            return value
        if isinstance(value, list) and value and (all(isinstance(p, str) for p in value)
                                                  or all(_is_ids(p) for p in value)):
            return value
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or "
                         "a list of token-id lists")


def _is_ids(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: either `prompt` or chat `messages`."""

    model_config = STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = None  # default: True for prompts, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    model: str | None = None
    tokens: list[int]
