"""How a model marks tool calls and reasoning in its output, found once at startup.

Tool calls are read by mlx-lm's own parsers (`mlx_lm.tool_parsers.<name>`: each module has
`tool_call_start`, `tool_call_end` and `parse_tool_call(text, tools)`), detected from the
tokenizer and chat template the way `mlx_lm.tokenizer_utils.load` does. This module adds
vLLM's parser names as aliases and Llama 3's JSON format, which mlx-lm has no parser for.
Reasoning is the text between the tokenizer's think markers (Qwen3's `<think>`...`</think>`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ParseFn = Callable[[str, Any], Any]

# vLLM's --tool-call-parser names -> mlx-lm's module names.
TOOL_PARSER_ALIASES: dict[str, str] = {
    "hermes": "json_tools", "qwen3": "json_tools", "qwen3_xml": "qwen3_coder",
    "llama4_json": "llama3_json", "glm45": "glm47", "minimax": "minimax_m2",
}
# vLLM's --reasoning-parser names whose markers are <think> ... </think>.
THINK_REASONING_PARSERS = ("qwen3", "deepseek_r1", "deepseek_v3", "glm45", "hunyuan_a13b", "think")


@dataclass(frozen=True)
class ToolFormat:
    """A tool-call format: `start` opens a call, `end` closes it ("" = the call runs to the
    end of the output), `parse` turns the text between them into one call or a list."""

    name: str
    start: str
    end: str
    parse: ParseFn
    bare_json: bool = False  # a call may also open with "{" at the very start of the output


@dataclass(frozen=True)
class ReasoningFormat:
    start: str
    end: str


def parse_llama3_json(text: str, tools: Any = None) -> list[dict[str, Any]]:
    """Llama 3.x JSON calls: `{"name": ..., "parameters": {...}}`, several joined by `;`."""
    decoder = json.JSONDecoder()
    calls, pos, text = [], 0, text.strip()
    while pos < len(text):
        call, pos = decoder.raw_decode(text, pos)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError(f"not a tool call: {call!r}")
        calls.append({"name": call["name"], "arguments": call.get("parameters", call.get("arguments", {}))})
        while pos < len(text) and text[pos] in "; \n\t":
            pos += 1
    if not calls:
        raise ValueError("no tool call")
    return calls


LLAMA3_JSON = ToolFormat("llama3_json", "<|python_tag|>", "", parse_llama3_json, bare_json=True)


def load_tool_format(name: str) -> ToolFormat:
    """The format for a vLLM or mlx-lm parser name; ValueError for unknown names."""
    module_name = TOOL_PARSER_ALIASES.get(name, name)
    if module_name == LLAMA3_JSON.name:
        return LLAMA3_JSON
    try:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{module_name}")
    except ImportError:
        raise ValueError(f"unknown tool-call parser {name!r}") from None
    return ToolFormat(module_name, module.tool_call_start, module.tool_call_end, module.parse_tool_call)


def detect_tool_format(tokenizer: Any, requested: str | None) -> ToolFormat | None:
    """`requested` (a parser name, or "none"), else what mlx-lm found for this tokenizer,
    else Llama 3's format when the chat template speaks it."""
    if requested == "none":
        return None
    if requested:
        return load_tool_format(requested)
    if getattr(tokenizer, "tool_parser", None) is not None:
        name = getattr(tokenizer, "init_kwargs", {}).get("tool_parser_type") or "mlx-lm"
        return ToolFormat(name, tokenizer.tool_call_start, tokenizer.tool_call_end or "",
                          tokenizer.tool_parser)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "<|python_tag|>" in template:
        return LLAMA3_JSON
    return None


def detect_reasoning_format(tokenizer: Any, requested: str | None) -> ReasoningFormat | None:
    """The think markers: `requested` ("none" turns reasoning parsing off), else the ones
    mlx-lm found in the vocabulary."""
    if requested == "none":
        return None
    if requested and requested not in THINK_REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {requested!r}; known: "
                         f"{', '.join(THINK_REASONING_PARSERS)}, none")
    if requested:
        return ReasoningFormat("<think>", "</think>")
    if getattr(tokenizer, "has_thinking", False):
        return ReasoningFormat(tokenizer.think_start, tokenizer.think_end)
    return None


def starts_in_reasoning(tokenizer: Any, prompt: list[int]) -> bool:
    """True when the prompt itself opened a think section (templates that end the
    generation prompt with `<think>\\n`), so the output begins as reasoning."""
    if not getattr(tokenizer, "has_thinking", False):
        return False
    return tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt)
