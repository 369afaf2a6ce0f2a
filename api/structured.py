"""Request fields -> the one grammar a request's output must match (engine/structured_output).

OpenAI: `response_format` (`json_object`, `json_schema` with `strict`), `tool_choice`
(`required` or a named function). vLLM: `structured_outputs` (`json`, `regex`, `choice`,
`grammar`, `json_object`) and the older `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`. Anthropic: `tool_choice` `any` / `tool`. A forced tool call is a Lark grammar
in the model's own tool-call format whose body is a JSON schema over the allowed tools, so the
tool parser reads the call back and its arguments match the tool's parameters.

Every spec is compiled (off the event loop, cached) before the request is queued: a bad one
is a 400 naming the field and the problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from shoal.api.errors import bad_request
from shoal.api.tool_formats import ToolFormat
from shoal.engine.async_engine import AsyncEngine
from shoal.engine.structured_output import StructuredOutput

# Tool-call formats whose call is one JSON object between markers: (arguments key, newlines).
JSON_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for response_format names
JSON_CALL_FORMATS = {"json_tools": ("arguments", "\n"), "llama3_json": ("parameters", "")}
VLLM_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def requested_output(req: Any, response_format: Any = None) -> tuple[StructuredOutput, str] | None:
    """The spec a request asks for and the field it came from; 400 if malformed or if two
    fields ask at once."""
    found: list[tuple[StructuredOutput, str]] = []
    if response_format is not None:
        spec = _response_format(response_format)
        if spec is not None:
            found.append((spec, "response_format"))
    if req.structured_outputs is not None:
        found.append((_structured_outputs(req.structured_outputs), "structured_outputs"))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        value = getattr(req, name)
        if value is not None:
            found.append((_spec(kind, value, name), name))
    if len(found) > 1:
        raise bad_request(f"Only one of {', '.join(f for _, f in found)} may be given.", found[1][1])
    return found[0] if found else None


def _response_format(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad_request("response_format must be an object with a `type`.", "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput.json_schema({"type": "object"})
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), (dict, bool)):
            raise bad_request("response_format.json_schema must be an object with a `schema`.",
                              "response_format.json_schema")
        if not isinstance(inner.get("name"), str) or not JSON_SCHEMA_NAME.fullmatch(inner["name"]):
            raise bad_request("Missing required parameter: 'response_format.json_schema.name' (1-64 letters, "
                              "digits, '_' or '-').", "response_format.json_schema.name")
        # `strict` or not, the output is generated to match the schema exactly.
        return StructuredOutput.json_schema(inner.get("schema", {}))
    raise bad_request(f"response_format type {kind!r} is not one of text, json_object, json_schema.",
                      "response_format.type")


def _structured_outputs(value: Any) -> StructuredOutput:
    if not isinstance(value, dict):
        raise bad_request("structured_outputs must be an object.", "structured_outputs")
    given = {k: v for k, v in value.items() if v is not None and v is not False
             and k in (*VLLM_KEYS, "json_object")}
    if len(given) != 1:
        raise bad_request("structured_outputs needs exactly one of json, regex, choice, grammar, "
                          "json_object.", "structured_outputs")
    key, spec = next(iter(given.items()))
    if key == "json_object":
        return StructuredOutput.json_schema({"type": "object"})
    return _spec(VLLM_KEYS[key], spec, f"structured_outputs.{key}")


def _spec(kind: str, value: Any, param: str) -> StructuredOutput:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise bad_request(f"`{param}` is not valid JSON: {exc}", param) from None
        if not isinstance(value, (dict, bool)):
            raise bad_request(f"`{param}` must be a JSON schema (an object).", param)
        return StructuredOutput.json_schema(value)
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise bad_request(f"`{param}` must be a non-empty list of non-empty strings.", param)
        return StructuredOutput.choice(value)
    if not isinstance(value, str) or not value:
        raise bad_request(f"`{param}` must be a non-empty string.", param)
    return StructuredOutput(kind, value)


def forced_tool_call(tools: list[dict[str, Any]] | None, name: str | None, tool_format: ToolFormat | None,
                     param: str, literal: Callable[[str], str] = json.dumps,
                     close_reasoning: str | None = None) -> StructuredOutput:
    """A grammar for exactly one call, in `tool_format`, to tool `name` (None: any of `tools`,
    given OpenAI-shaped: {"type": "function", "function": {"name", "parameters"}}). `literal`
    renders a marker as a Lark terminal (StructuredOutputManager.lark_literal). When the output
    starts inside a think section, `close_reasoning` (its end marker) comes first, so the call
    is not read as reasoning."""
    functions = [t.get("function") for t in tools or () if isinstance(t, dict)]
    functions = [f for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str)]
    if not functions:
        raise bad_request("Forcing a tool call needs at least one tool in `tools`.", param)
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise bad_request(f"tool_choice names {name!r}, which is not in `tools`.", param)
    if tool_format is None or tool_format.name not in JSON_CALL_FORMATS:
        have = tool_format.name if tool_format else "none"
        raise bad_request(f"Forcing a tool call needs a JSON tool-call format ({', '.join(JSON_CALL_FORMATS)}; "
                          f"--tool-call-parser hermes selects json_tools); this server's is {have}.", param)
    arguments_key, newline = JSON_CALL_FORMATS[tool_format.name]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", arguments_key],
              "properties": {"name": {"const": f["name"]},
                             arguments_key: _parameters(f.get("parameters"))}} for f in functions]
    schema = {"x-guidance": {"whitespace_flexible": False}, "anyOf": calls}
    head = [literal(close_reasoning), json.dumps("\n\n")] if close_reasoning else []
    parts = [*head, literal(tool_format.start), json.dumps(newline) if newline else "", "call"]
    if tool_format.end:
        parts += [json.dumps(newline) if newline else "", literal(tool_format.end)]
    lark = f"start: {' '.join(p for p in parts if p)}\ncall: %json {json.dumps(schema)}\n"
    return StructuredOutput("grammar", lark)


def _parameters(schema: Any) -> dict[str, Any]:
    if not isinstance(schema, dict) or not schema:
        return {"type": "object"}
    return {k: v for k, v in schema.items() if k != "$schema"}


async def compiled(engine: AsyncEngine, found: tuple[StructuredOutput, str] | None) -> StructuredOutput | None:
    """The spec, compiled and cached off the event loop; a 400 naming `param` if it is bad."""
    if found is None:
        return None
    spec, param = found
    try:
        await engine.compile_structured_output(spec)
    except ValueError as exc:
        raise bad_request(f"Invalid `{param}`: {exc}", param) from None
    return spec
