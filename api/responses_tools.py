"""Responses API tools -> the function tools chat templates render, and back.

    function   {"type": "function", "name", "parameters", "strict"}   -> as is
    namespace  {"type": "namespace", "name": "ns", "tools": [...]}    -> each as "ns__name"
    custom     {"type": "custom", "name", "format": text | grammar}  -> one string argument `input`
    hosted     web_search, file_search, code_interpreter, ...        -> dropped (logged once)

A call the model makes is mapped back through `ResponseTools.origin`: a namespaced name to
its namespace and name, a custom tool's `{"input": ...}` to the raw input text.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from shoal.api.errors import bad_request
from shoal.api.response_store import ResponseStore
from shoal.engine.structured_output import StructuredOutput

log = logging.getLogger("shoal")
NAMESPACE_SEPARATOR = "__"
CUSTOM_INPUT = "input"
GRAMMAR_KINDS = {"lark": "grammar", "regex": "regex"}  # OpenAI syntax -> StructuredOutput kind


@dataclass(frozen=True)
class ToolOrigin:
    """What a template tool name stands for in the Responses API."""

    name: str
    namespace: str | None = None
    custom: bool = False
    grammar: StructuredOutput | None = None  # a custom tool's input grammar


@dataclass(frozen=True)
class ResponseTools:
    chat_tools: list[dict[str, Any]] | None  # OpenAI function tools, as templates take them
    origins: dict[str, ToolOrigin]  # template name -> origin

    def origin(self, flat: str) -> ToolOrigin:
        return self.origins.get(flat, ToolOrigin(flat))


@dataclass(frozen=True)
class ToolChoice:
    parse_tools: bool = True  # read tool calls out of the output
    forced: bool = False  # exactly one function call, by grammar
    name: str | None = None  # the forced tool's template name (None: any tool)
    custom: ToolOrigin | None = None  # forced custom tool: the whole output is its input


def flat_name(name: str, namespace: str | None) -> str:
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name


def convert_tools(tools: list[Any] | None, store: ResponseStore) -> ResponseTools:
    chat_tools: list[dict[str, Any]] = []
    origins: dict[str, ToolOrigin] = {}
    for i, tool in enumerate(tools or ()):
        where = f"tools[{i}]"
        kind = _type(tool, where)
        if kind == "namespace":
            inner = tool.get("tools")
            if not isinstance(inner, list) or not isinstance(tool.get("name"), str):
                raise bad_request(f"{where}: a namespace needs a `name` and a list of `tools`.", where)
            for j, member in enumerate(inner):
                _add(member, f"{where}.tools[{j}]", tool["name"], chat_tools, origins)
        elif kind in ("function", "custom"):
            _add(tool, where, None, chat_tools, origins)
        elif store.first_drop(kind):
            log.info("dropping hosted tool %r from Responses requests (Shoal cannot run it)", kind)
    return ResponseTools(chat_tools or None, origins)


def _type(tool: Any, where: str) -> str:
    if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
        raise bad_request(f"{where} must be a tool object with a `type`.", f"{where}.type")
    return tool["type"]


def _add(tool: Any, where: str, namespace: str | None, chat_tools: list[dict[str, Any]],
         origins: dict[str, ToolOrigin]) -> None:
    kind = _type(tool, where)
    if kind not in ("function", "custom") or not isinstance(tool.get("name"), str) or not tool["name"]:
        raise bad_request(f"{where} must be a function or custom tool with a `name`.", where)
    flat = flat_name(tool["name"], namespace)
    if kind == "function":
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise bad_request(f"{where}.parameters must be a JSON schema object.", f"{where}.parameters")
        origin = ToolOrigin(tool["name"], namespace)
    else:
        grammar, hint = _custom_format(tool.get("format"), f"{where}.format")
        parameters = {"type": "object", "required": [CUSTOM_INPUT], "additionalProperties": False,
                      "properties": {CUSTOM_INPUT: {"type": "string", "description": hint}}}
        origin = ToolOrigin(tool["name"], namespace, custom=True, grammar=grammar)
    function = {"name": flat, "parameters": {k: v for k, v in parameters.items() if k != "$schema"}}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    chat_tools.append({"type": "function", "function": function})
    origins[flat] = origin


def _custom_format(fmt: Any, where: str) -> tuple[StructuredOutput | None, str]:
    """A custom tool's input grammar (None: free text) and how the argument is described."""
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None, "The tool's input, as free text."
    if not isinstance(fmt, dict) or fmt.get("type") != "grammar":
        raise bad_request(f"{where} must be {{\"type\": \"text\"}} or {{\"type\": \"grammar\", ...}}.", where)
    syntax, definition = fmt.get("syntax"), fmt.get("definition")
    if syntax not in GRAMMAR_KINDS:
        raise bad_request(f"{where}.syntax must be 'lark' or 'regex', got {syntax!r}.", f"{where}.syntax")
    if not isinstance(definition, str) or not definition.strip():
        raise bad_request(f"{where}.definition must be a non-empty grammar.", f"{where}.definition")
    hint = f"The tool's input, as text matching this {syntax} grammar:\n{definition}"
    return StructuredOutput(GRAMMAR_KINDS[syntax], definition), hint


def tool_choice(choice: Any, tools: ResponseTools) -> ToolChoice:
    """auto / none / required / {"type": "function" | "custom", "name"} /
    {"type": "allowed_tools", "mode": "auto" | "required", "tools": [...]} (mode only)."""
    if choice is None or choice == "auto":
        return ToolChoice()
    if choice == "none":
        return ToolChoice(parse_tools=False)
    if choice == "required":
        return _forced(tools, None)
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
        name = choice.get("name")
        if not isinstance(name, str):
            raise bad_request("tool_choice needs the `name` of the tool to call.", "tool_choice.name")
        flat = flat_name(name, choice.get("namespace") if isinstance(choice.get("namespace"), str) else None)
        if flat not in tools.origins:
            raise bad_request(f"tool_choice names {name!r}, which is not in `tools`.", "tool_choice.name")
        origin = tools.origins[flat]
        if origin.custom != (choice["type"] == "custom"):
            raise bad_request(f"tool_choice type {choice['type']!r} does not match tool {name!r}.",
                              "tool_choice.type")
        return ToolChoice(parse_tools=False, custom=origin) if origin.custom else _forced(tools, flat)
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        return tool_choice(choice.get("mode", "auto"), tools)
    raise bad_request("tool_choice must be 'none', 'auto', 'required', or a function or custom tool "
                      "by name (hosted tools cannot be forced here).", "tool_choice")


def _forced(tools: ResponseTools, name: str | None) -> ToolChoice:
    if not tools.chat_tools:
        raise bad_request("Forcing a tool call needs at least one function or custom tool in `tools`.",
                          "tool_choice")
    return ToolChoice(forced=True, name=name)


def custom_input(arguments: str) -> str:
    """A custom tool's raw input from the arguments the model wrote (`{"input": ...}`);
    anything else is given back whole."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get(CUSTOM_INPUT), str) and len(value) == 1:
        return value[CUSTOM_INPUT]
    return arguments
