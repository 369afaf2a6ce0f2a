"""Anthropic Messages requests -> the chat service's `ChatPrompt` and `SamplingParams`.

Everything Claude Code sends is accepted (see shared/claude-code/): `system` as a string or
text blocks, `role: "system"` turns anywhere (kept in place: moving them would rewrite the
prompt head and miss the prefix cache), `text`, `tool_use`, `tool_result`, `thinking` and
`redacted_thinking` blocks; `cache_control`, `defer_loading`, `metadata`,
`context_management` and `output_config` are ignored. Its per-request billing line
(`x-anthropic-billing-header: ...`) is dropped so consecutive turns share a prefix.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shoal.api.chat import ChatPrompt
from shoal.api.errors import APIError, bad_request
from shoal.api.protocol import INT32_MAX
from shoal.api.sampling import SamplingDefaults, given
from shoal.engine.sampling_params import SamplingParams, SamplingParamsError
from shoal.engine.structured_output import StructuredOutput

STRICT = ConfigDict(strict=True, extra="ignore", frozen=True)
BILLING_HEADER = "x-anthropic-billing-header"
Content = str | list[dict[str, Any]]


class AnthropicMessage(BaseModel):
    model_config = STRICT
    role: Literal["user", "assistant", "system"]
    content: Content


class MessagesRequest(BaseModel):
    """`POST /v1/messages` and `/v1/messages/count_tokens` (which needs no max_tokens)."""

    model_config = STRICT
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    system: Content | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


def chat_prompt(req: MessagesRequest) -> ChatPrompt:
    messages: list[dict[str, Any]] = []
    if system := system_text(req.system, "system"):
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(req.messages):
        messages += convert_message(message, f"messages[{i}]")
    prefill = req.messages[-1].role == "assistant"  # the answer continues this turn
    return ChatPrompt(messages, function_tools(req.tools), {"enable_thinking": thinking_on(req)},
                      add_generation_prompt=not prefill, continue_final_message=prefill)


def system_text(system: Content | None, where: str) -> str:
    if system is None or isinstance(system, str):
        return "" if system is None or system.startswith(BILLING_HEADER) else system
    texts = [_text_block(block, f"{where}[{j}]") for j, block in enumerate(system)]
    return "\n".join(t for t in texts if not t.startswith(BILLING_HEADER))


def convert_message(message: AnthropicMessage, where: str) -> list[dict[str, Any]]:
    """One Anthropic turn -> template messages: tool results become `tool` messages (in
    their order, before the turn's text); an assistant turn keeps text, reasoning and calls."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        return [_assistant(message.content, where)]
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(message.content):
        kind, loc = _kind(block, f"{where}.content[{j}]"), f"{where}.content[{j}]"
        if kind == "tool_result":
            out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                        "content": _tool_result_text(block, loc)})
        elif kind == "text":
            texts.append(_text_block(block, loc))
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise _unsupported_block(kind, loc)
    if texts or not out:
        out.append({"role": message.role, "content": "\n".join(texts)})
    return out


def _assistant(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    texts, reasoning, calls = [], [], []
    for j, block in enumerate(blocks):
        kind, loc = _kind(block, f"{where}.content[{j}]"), f"{where}.content[{j}]"
        if kind == "text":
            texts.append(_text_block(block, loc))
        elif kind == "thinking":
            reasoning.append(str(block.get("thinking", "")))
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                raise bad_request(f"{loc}: a tool_use block needs a `name` and an object `input`.", loc)
            calls.append({"id": str(block.get("id", "")), "type": "function",
                          "function": {"name": block["name"], "arguments": block.get("input", {})}})
        else:
            raise _unsupported_block(kind, loc)
    out: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if reasoning:
        out["reasoning_content"] = "\n".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out


def _tool_result_text(block: dict[str, Any], where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            kind, loc = _kind(part, f"{where}.content[{k}]"), f"{where}.content[{k}]"
            if kind == "text":
                parts.append(_text_block(part, loc))
            elif kind == "tool_reference":
                parts.append(f"Tool loaded: {part.get('tool_name', '')}")
            elif kind in ("image", "document"):
                # A tool's picture (Claude Code reading a PNG) must not fail the whole turn.
                parts.append(f"[{kind} omitted: this model does not accept {kind} input]")
            else:
                raise _unsupported_block(kind, loc)
        text = "\n".join(parts)
    else:
        raise bad_request(f"{where}.content must be a string or a list of blocks.", where)
    return f"Error: {text}" if block.get("is_error") else text


def _kind(block: Any, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise bad_request(f"{where} must be a content block with a `type`.", where)
    return block["type"]


def _text_block(block: Any, where: str) -> str:
    if _kind(block, where) != "text" or not isinstance(block.get("text"), str):
        raise bad_request(f"{where} must be a text block: {{\"type\": \"text\", \"text\": ...}}.", where)
    return block["text"]


def _unsupported_block(kind: str, where: str) -> APIError:
    if kind in ("image", "document"):
        return bad_request(f"{where}: this model does not accept {kind} input (it has no vision).", where)
    return bad_request(f"{where}: unsupported content block type {kind!r}.", where)


def function_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Anthropic tools -> the OpenAI function tools chat templates render."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool.get("name"), str):
            raise bad_request(f"tools[{i}] needs a `name`.", f"tools[{i}]")
        schema = tool.get("input_schema") or {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise bad_request(f"tools[{i}].input_schema must be an object.", f"tools[{i}]")
        schema = {k: v for k, v in schema.items() if k != "$schema"}
        function = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def thinking_on(req: MessagesRequest) -> bool:
    """`thinking: {type: enabled | adaptive}` turns the model's thinking on; absent or
    `disabled` keeps it off (Anthropic's default)."""
    return isinstance(req.thinking, dict) and req.thinking.get("type") in ("enabled", "adaptive")


def parse_tools(req: MessagesRequest) -> bool:
    """Whether to read tool calls out of the output."""
    kind = (req.tool_choice or {}).get("type", "auto")
    if kind not in ("auto", "none", "any", "tool"):
        raise bad_request(f"Unknown tool_choice type {kind!r}.", "tool_choice")
    return kind != "none"


def forced_tool(req: MessagesRequest) -> tuple[bool, str | None]:
    """Whether `tool_choice` forces a call: `any` (some tool, name None) or `tool` (that one)."""
    choice = req.tool_choice or {}
    kind = choice.get("type", "auto")
    if kind not in ("any", "tool"):
        return False, None
    name = choice.get("name") if kind == "tool" else None
    if kind == "tool" and not isinstance(name, str):
        raise bad_request("tool_choice of type 'tool' needs a `name`.", "tool_choice")
    return True, name


def prompt_too_long(num_prompt: int, max_model_len: int) -> APIError:
    """Anthropic's wording, which Claude Code parses to compact the conversation."""
    return bad_request(f"prompt is too long: {num_prompt} tokens > {max_model_len - 1} maximum",
                       "messages")


def sampling_params(req: MessagesRequest, num_prompt: int, max_model_len: int,
                    defaults: SamplingDefaults, structured: StructuredOutput | None = None) -> SamplingParams:
    """`max_tokens` clamped to the room left in the context window (Claude Code asks for
    32000 whatever the model)."""
    if req.max_tokens is None:
        raise bad_request("Missing required field `max_tokens`.", "max_tokens")
    if num_prompt >= max_model_len:
        raise prompt_too_long(num_prompt, max_model_len)
    try:
        return SamplingParams(
            temperature=given(req.temperature, defaults.temperature),
            top_p=given(req.top_p, defaults.top_p), top_k=given(req.top_k, defaults.top_k),
            min_p=defaults.min_p, repetition_penalty=defaults.repetition_penalty,
            max_tokens=min(req.max_tokens, max_model_len - num_prompt),
            stop=tuple(req.stop_sequences or ()), structured_output=structured)
    except SamplingParamsError as exc:
        raise bad_request(str(exc), exc.param) from None
