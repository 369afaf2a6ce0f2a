"""Grammars through the Responses API, on a random-weight model served with the hermes
(json_tools) tool-call format: `text.format` json_schema / json_object (the SDK's
`responses.parse` and `responses.stream` with a pydantic model), forced function calls
(strict arguments, namespaced tools mapped back), and forced custom tools whose input is
generated to match their Lark or regex grammar."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pydantic
import pytest

pytest.register_assert_rewrite("server_util", "responses_util")
from responses_util import post_stream  # noqa: E402
from server_util import Server  # noqa: E402

pytest_plugins = ["server_util"]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130}}}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather now.", "strict": True,
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                          "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}}}}
SUM_LARK = 'start: NUM " + " NUM\nNUM: /[0-9]{1,3}/\n'
SUM_RE = re.compile(r"[0-9]{1,3} \+ [0-9]{1,3}")
CALC = {"type": "custom", "name": "calc", "description": "Adds two numbers.",
        "format": {"type": "grammar", "syntax": "lark", "definition": SUM_LARK}}
DATE = {"type": "custom", "name": "date", "description": "A date.",
        "format": {"type": "grammar", "syntax": "regex", "definition": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=130)


@pytest.fixture(scope="module")
def client(hermes_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=hermes_server.url("/v1"), api_key="none", max_retries=0, timeout=120)


def test_json_schema_text_format_validates(client):
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    out = client.responses.create(model="tiny", input="A person, in JSON.", text={"format": fmt},
                                  max_output_tokens=300)
    assert out.status == "completed"
    jsonschema.validate(json.loads(out.output_text), PERSON)
    loose = client.responses.create(model="tiny", input="JSON.", text={"format": {"type": "json_object"}},
                                    max_output_tokens=300)
    assert isinstance(json.loads(loose.output_text), dict)


def test_sdk_parse_and_stream_with_a_pydantic_model(client):
    parsed = client.responses.parse(model="tiny", input="A person.", text_format=Person, max_output_tokens=300)
    assert isinstance(parsed.output_parsed, Person)
    with client.responses.stream(model="tiny", input="A person.", text_format=Person,
                                 max_output_tokens=300) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Person) and "".join(deltas) == final.output_text


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_function_call_has_strict_arguments(client, choice):
    out = client.responses.create(model="tiny", input="Weather?", tools=[WEATHER], tool_choice=choice,
                                  max_output_tokens=300)
    calls = [item for item in out.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", out.output
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])


def test_sdk_parse_reads_function_call_arguments(client):
    tool = openai.pydantic_function_tool(Person, name="add_person")
    flat = {"type": "function", "name": tool["function"]["name"], "strict": True,
            "parameters": tool["function"]["parameters"]}
    out = client.responses.parse(model="tiny", input="Add someone.", tools=[flat], tool_choice="required",
                                 max_output_tokens=300)
    call = next(item for item in out.output if item.type == "function_call")
    assert call.name == "add_person"
    Person.model_validate_json(call.arguments)


def test_namespaced_tool_is_flattened_and_mapped_back(client, hermes_server: Server):
    tools = [{"type": "namespace", "name": "weather_ns", "description": "Weather tools.", "tools": [WEATHER]}]
    body = {"model": "tiny", "input": "Weather?", "tools": tools, "tool_choice": "required",
            "max_output_tokens": 300}
    for out in (client.responses.create(**body).model_dump(), post_stream(hermes_server.base_url, body)):
        call = next(item for item in out["output"] if item["type"] == "function_call")
        assert call["name"] == "get_weather" and call["namespace"] == "weather_ns"


@pytest.mark.parametrize("tool, pattern", [(CALC, SUM_RE), (DATE, re.compile(DATE["format"]["definition"]))])
def test_forced_custom_tool_input_matches_its_grammar(client, hermes_server: Server, tool: dict,
                                                      pattern: re.Pattern):
    body = {"model": "tiny", "input": "Go.", "tools": [tool, WEATHER],
            "tool_choice": {"type": "custom", "name": tool["name"]}, "max_output_tokens": 64}
    whole = client.responses.create(**body)
    streamed = post_stream(hermes_server.base_url, body)
    for out in (whole.model_dump(), streamed):
        assert out["status"] == "completed"
        calls = [item for item in out["output"] if item["type"] == "custom_tool_call"]
        assert len(calls) == 1 and calls[0]["name"] == tool["name"] and calls[0]["call_id"]
        assert pattern.fullmatch(calls[0]["input"]), calls[0]["input"]


def test_custom_tool_grammar_is_checked_before_running(hermes_server: Server):
    import httpx

    bad = {**CALC, "format": {**CALC["format"], "definition": "start: (("}}
    body = {"model": "tiny", "input": "Go.", "tools": [bad], "tool_choice": {"type": "custom", "name": "calc"}}
    response = httpx.post(hermes_server.url("/v1/responses"), json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
