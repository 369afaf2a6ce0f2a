"""Responses API requests (`POST /v1/responses`) -> the chat service's `ChatPrompt`,
`SamplingParams` and grammar.

Input is a string (one user turn) or items: `message` (roles system, developer, user,
assistant; `input_text` / `output_text` parts), `reasoning`, `function_call`,
`function_call_output`, `custom_tool_call`, `custom_tool_call_output`. A run of assistant-side
items (reasoning, text, calls) becomes one assistant turn, as templates expect. `developer`
is the system role; system turns stay where they stand (the prefix cache needs a stable head).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shoal.api.errors import APIError, bad_request
from shoal.api.responses_tools import CUSTOM_INPUT, flat_name
from shoal.api.sampling import SamplingDefaults, given
from shoal.engine.sampling_params import SamplingParams, SamplingParamsError
from shoal.engine.structured_output import StructuredOutput

INCLUDABLE = {"reasoning.encrypted_content", "message.output_text.logprobs",
              "web_search_call.action.sources", "web_search_call.results", "code_interpreter_call.outputs",
              "computer_call_output.output.image_url", "file_search_call.results",
              "message.input_image.image_url"}
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text", "refusal")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ResponsesRequest(BaseModel):
    """Every field of OpenAI's `responses.create`; unknown fields are a 400 naming them."""

    model_config = ConfigDict(extra="allow", frozen=True)
    model: str
    input: str | list[Any] = ""
    instructions: str | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    max_tool_calls: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(None, ge=0, le=0)  # logprobs are not returned here
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    client_metadata: dict[str, Any] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    service_tier: str | None = None
    background: bool | None = None
    stream_options: dict[str, Any] | None = None

    def check(self) -> None:
        """What pydantic's types do not say: unknown fields and unsupported values."""
        if self.model_extra:
            name = next(iter(self.model_extra))
            raise bad_request(f"Unknown parameter: '{name}'.", name)
        if self.truncation == "auto":
            raise bad_request("truncation 'auto' is not supported: Shoal never drops input silently; "
                              "a prompt that does not fit fails with context_length_exceeded.", "truncation")
        if self.background:
            raise bad_request("background responses are not supported.", "background")
        if self.service_tier is not None and self.service_tier not in SERVICE_TIERS:
            raise bad_request(f"Invalid service_tier {self.service_tier!r}.", "service_tier")
        for value in self.include or ():
            if value not in INCLUDABLE:
                raise bad_request(f"Invalid include value {value!r}.", "include")
        if self.metadata is not None and len(self.metadata) > 16:
            raise bad_request("metadata holds at most 16 pairs.", "metadata")
        effort(self)


def effort(req: ResponsesRequest) -> str | None:
    value = (req.reasoning or {}).get("effort")
    if value is not None and value not in EFFORTS:
        raise bad_request(f"reasoning.effort must be one of {', '.join(EFFORTS)}.", "reasoning.effort")
    return value


def template_kwargs(req: ResponsesRequest) -> dict[str, Any]:
    """reasoning.effort as the template's switches: Qwen3's `enable_thinking`, gpt-oss's
    `reasoning_effort`. Without an effort the template's default stands."""
    value = effort(req)
    if value is None:
        return {}
    on = value not in ("none", "minimal")
    return {"enable_thinking": on, **({"reasoning_effort": value} if on else {})}


def text_format(req: ResponsesRequest) -> tuple[StructuredOutput, str] | None:
    fmt = (req.text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad_request("text.format must be an object with a `type`.", "text.format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return StructuredOutput.json_schema({"type": "object"}), "text.format"
    if fmt["type"] == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise bad_request("text.format.schema must be a JSON schema object.", "text.format.schema")
        return StructuredOutput.json_schema(schema), "text.format"
    raise bad_request(f"text.format type {fmt['type']!r} is not one of text, json_object, json_schema.",
                      "text.format.type")


def input_items(value: str | list[Any]) -> list[dict[str, Any]]:
    """The input as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad_request(f"input[{i}] must be an item object.", f"input[{i}]")
    return list(value)


def chat_messages(items: list[dict[str, Any]], instructions: str | None,
                  first: int = 0) -> list[dict[str, Any]]:
    """Template messages for the conversation; `first` is the index of the request's own
    first item (earlier ones came from `previous_response_id`), for error locations."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    turn = AssistantTurn()
    names: dict[str, str] = {}  # call_id -> tool name, for the tool turns
    for i, item in enumerate(items):
        where = f"input[{i - first}]" if i >= first else f"previous_response_id (item {i})"
        kind = item.get("type", "message")
        if kind in ("reasoning", "function_call", "custom_tool_call") or (
                kind == "message" and item.get("role") == "assistant"):
            turn.add(item, kind, where, names)
            continue
        messages += turn.flush()
        if kind == "message":
            messages.append(_message(item, where))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = str(item.get("call_id", ""))
            messages.append({"role": "tool", "tool_call_id": call_id, "name": names.get(call_id, ""),
                             "content": _text(item.get("output", ""), f"{where}.output")})
        else:
            raise bad_request(f"{where}: unsupported input item type {kind!r}.", f"{where}.type")
    return messages + turn.flush()


class AssistantTurn:
    """Consecutive assistant-side items, folded into one template message."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict[str, Any]] = []

    def add(self, item: dict[str, Any], kind: str, where: str, names: dict[str, str]) -> None:
        if kind == "reasoning":  # encrypted_content is not ours to read
            parts = item.get("content") or item.get("summary") or []
            self.reasoning.append(_text(parts, f"{where}.content"))
        elif kind == "message":
            if self.calls:  # text after calls opens a new turn
                self.texts, self.reasoning, self.calls = [], [], []
            self.texts.append(_text(item.get("content", ""), f"{where}.content"))
        else:
            self.calls.append(_call(item, kind, where, names))

    def flush(self) -> list[dict[str, Any]]:
        if not (self.texts or self.reasoning or self.calls):
            return []
        message: dict[str, Any] = {"role": "assistant", "content": "\n".join(self.texts)}
        if self.reasoning:
            message["reasoning_content"] = "\n".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = self.calls
        self.texts, self.reasoning, self.calls = [], [], []
        return [message]


def _call(item: dict[str, Any], kind: str, where: str, names: dict[str, str]) -> dict[str, Any]:
    name = item.get("name")
    if not isinstance(name, str):
        raise bad_request(f"{where}: a {kind} item needs a `name`.", f"{where}.name")
    namespace = item.get("namespace") if isinstance(item.get("namespace"), str) else None
    flat = flat_name(name, namespace)
    if kind == "custom_tool_call":
        arguments = json.dumps({CUSTOM_INPUT: str(item.get("input", ""))}, ensure_ascii=False)
    else:
        arguments = item.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise bad_request(f"{where}.arguments must be a JSON string.", f"{where}.arguments")
    call_id = str(item.get("call_id", ""))
    names[call_id] = flat
    return {"id": call_id, "type": "function", "function": {"name": flat, "arguments": arguments}}


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}.", f"{where}.role")
    return {"role": ROLES[role], "content": _text(item.get("content", ""), f"{where}.content")}


def _text(content: Any, where: str) -> str:
    """A string, or the text of a list of content parts; images, files and audio are a 400."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts.", where)
    texts = []
    for j, part in enumerate(content):
        loc = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            texts.append(str(part.get("text", part.get("refusal", ""))))
        elif kind in ("input_image", "input_file", "input_audio"):
            raise bad_request(f"{loc}: this model does not accept {kind.removeprefix('input_')} input "
                              "(it has no vision or audio).", loc)
        else:
            raise bad_request(f"{loc}: unsupported content part type {kind!r}.", f"{loc}.type")
    return "\n".join(texts)


def prompt_too_long(num_prompt: int, max_model_len: int) -> APIError:
    """OpenAI's code for a prompt over the window, which Codex answers by compacting."""
    return APIError(400, f"Your input exceeds the context window of this model: {num_prompt} tokens "
                         f"> {max_model_len - 1} maximum.", "input", code="context_length_exceeded")


def sampling_params(req: ResponsesRequest, num_prompt: int, max_model_len: int,
                    defaults: SamplingDefaults, structured: StructuredOutput | None) -> SamplingParams:
    """`max_output_tokens` clamped to the room left in the window (none given: all of it)."""
    if num_prompt >= max_model_len:
        raise prompt_too_long(num_prompt, max_model_len)
    room = max_model_len - num_prompt
    try:
        return SamplingParams(
            temperature=given(req.temperature, defaults.temperature),
            top_p=given(req.top_p, defaults.top_p), top_k=defaults.top_k, min_p=defaults.min_p,
            repetition_penalty=defaults.repetition_penalty,
            max_tokens=min(given(req.max_output_tokens, room), room), structured_output=structured)
    except SamplingParamsError as exc:
        raise bad_request(str(exc), exc.param) from None
