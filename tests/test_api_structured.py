"""Structured output and forced tool calls over real HTTP, on a random-weight model served with
the hermes (json_tools) tool-call format: OpenAI response_format (and the SDK's `parse`),
vLLM's structured_outputs and guided_* fields, tool_choice required / named, Anthropic
tool_choice any / tool; bad specs are 400s naming the field; a dead end ends one request."""

from __future__ import annotations

import json
import re

import anthropic
import httpx
import jsonschema
import openai
import pydantic
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import Server  # noqa: E402

pytest_plugins = ["server_util"]
MSGS = [{"role": "user", "content": "Reply in JSON."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                          "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130}}}


@pytest.fixture(scope="module")
def client(hermes_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=hermes_server.url("/v1"), api_key="none", max_retries=0, timeout=120)


def chat(server: Server, **fields) -> httpx.Response:
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 300, **fields}
    return httpx.post(server.url("/v1/chat/completions"), json=body, timeout=120)


def test_response_format_json_schema_every_choice_validates(hermes_server: Server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    response = chat(hermes_server, response_format=fmt, n=4, temperature=1.0, seed=3, logprobs=True)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 4
    for choice in choices:
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
        assert choice["finish_reason"] == "stop" and choice["logprobs"]["content"]


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI):
    class Point(pydantic.BaseModel):
        x: int = pydantic.Field(ge=0, le=9)
        y: int = pydantic.Field(ge=0, le=9)
        label: str = pydantic.Field(max_length=6)

    completion = client.chat.completions.parse(model="tiny", messages=MSGS, response_format=Point,
                                               max_tokens=200, temperature=0)
    point = completion.choices[0].message.parsed
    assert isinstance(point, Point) and 0 <= point.x <= 9 and len(point.label) <= 6


def test_json_object_streamed(hermes_server: Server):
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 300, "stream": True, "temperature": 0,
            "response_format": {"type": "json_object"}}
    with httpx.stream("POST", hermes_server.url("/v1/chat/completions"), json=body, timeout=120) as response:
        frames = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(f) for f in frames if f != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("fields,check", [
    ({"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}}, lambda t: re.fullmatch(r"[a-c]{3}-[0-9]{2}", t)),
    ({"structured_outputs": {"choice": ["yes", "no", "maybe"]}}, lambda t: t in ("yes", "no", "maybe")),
    ({"structured_outputs": {"json": PERSON}}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ({"structured_outputs": {"grammar": 'start: "ab" NUM\nNUM: /[0-9]{1,3}/'}},
     lambda t: re.fullmatch(r"ab[0-9]{1,3}", t)),
    ({"structured_outputs": {"grammar": 'root ::= "x" [0-9] [0-9]'}}, lambda t: re.fullmatch(r"x[0-9]{2}", t)),
    ({"guided_json": json.dumps(PERSON)}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ({"guided_regex": "(red|blue)[0-9]"}, lambda t: re.fullmatch(r"(red|blue)[0-9]", t)),
    ({"guided_choice": ["north", "south"]}, lambda t: t in ("north", "south")),
], ids=["regex", "choice", "json", "lark", "gbnf", "guided_json", "guided_regex", "guided_choice"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_vllm_structured_outputs(hermes_server: Server, fields, check, endpoint):
    for temperature in (0.0, 1.0):
        if endpoint == "chat":
            response = chat(hermes_server, temperature=temperature, seed=1, **fields)
            text = response.json()["choices"][0]["message"]["content"]
        else:
            response = httpx.post(hermes_server.url("/v1/completions"), timeout=120, json={
                "model": "tiny", "prompt": "answer:", "max_tokens": 200, "temperature": temperature,
                "seed": 1, **fields})
            text = response.json()["choices"][0]["text"]
        assert response.status_code == 200, response.text
        assert check(text), (fields, text)


def assert_weather_call(call_name: str, arguments: dict) -> None:
    assert call_name == "get_weather"
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_openai_forced_tool_call(client: openai.OpenAI, tool_choice):
    tools = [WEATHER] if tool_choice == "required" else [TIME, WEATHER]
    for temperature in (0.0, 1.0):
        out = client.chat.completions.create(model="tiny", messages=MSGS, tools=tools, tool_choice=tool_choice,
                                             max_tokens=300, temperature=temperature, seed=2)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert_weather_call(call.function.name, json.loads(call.function.arguments))


def test_openai_required_picks_one_of_several_tools_validly(client: openai.OpenAI):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for seed in range(4):
        out = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, TIME],
                                             tool_choice="required", max_tokens=300, temperature=1.0, seed=seed)
        (call,) = out.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}], ids=["any", "tool"])
def test_anthropic_forced_tool_call(hermes_server: Server, tool_choice):
    client = anthropic.Anthropic(base_url=hermes_server.base_url, api_key="none", max_retries=0, timeout=120)
    tools = [{"name": "get_weather", "description": "Weather now.",
              "input_schema": WEATHER["function"]["parameters"]}]
    for stream in (False, True):
        kwargs = dict(model="tiny", max_tokens=300, tools=tools, tool_choice=tool_choice,
                      messages=[{"role": "user", "content": "Weather in Paris?"}])
        if stream:
            with client.messages.stream(**kwargs) as events:
                message = events.get_final_message()
        else:
            message = client.messages.create(**kwargs)
        assert message.stop_reason == "tool_use"
        (block,) = [b for b in message.content if b.type == "tool_use"]
        assert_weather_call(block.name, block.input)


@pytest.mark.parametrize("fields,param,message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs", "undefined_rule"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "Only one"),
    ({"tool_choice": "required"}, "tool_choice", "at least one tool"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "cannot be combined"),
], ids=["bad-schema", "bad-format-type", "bad-regex", "two-kinds", "bad-lark", "empty-choice", "bad-json-text",
        "two-fields", "required-no-tools", "unknown-tool", "bad-tool-choice", "forced-and-format"])
def test_bad_specs_are_400s_naming_the_field(hermes_server: Server, fields, param, message):
    response = chat(hermes_server, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert chat(hermes_server, max_tokens=3).status_code == 200


def test_forcing_a_call_without_a_json_tool_format_is_a_400(tiny_server: Server):
    response = chat(tiny_server, tools=[WEATHER], tool_choice="required")
    assert response.status_code == 400 and "JSON tool-call format" in response.json()["error"]["message"]


def test_a_grammar_dead_end_ends_only_that_request(hermes_server: Server):
    """The grammar allows only "a", and min_tokens bans "a" (as a stop token id): no token is
    possible. That request ends with an error; the server keeps serving."""
    a = httpx.post(hermes_server.url("/tokenize"), json={"prompt": "a", "add_special_tokens": False},
                   timeout=30).json()["tokens"]
    response = httpx.post(hermes_server.url("/v1/completions"), timeout=60, json={
        "model": "tiny", "prompt": "x", "max_tokens": 5, "min_tokens": 2, "stop_token_ids": a,
        "structured_outputs": {"regex": "a+"}})
    assert response.status_code == 500 and "grammar" in response.json()["error"]["message"]
    assert chat(hermes_server, max_tokens=3).status_code == 200
    assert httpx.get(hermes_server.url("/health"), timeout=10).status_code == 200


def test_forced_call_when_the_marker_is_a_special_token(agent_server: Server):
    """The agent model's vocabulary has `<tool_call>` as one special token (as Qwen's has):
    the grammar must emit that token, which no byte string matches."""
    client = anthropic.Anthropic(base_url=agent_server.base_url, api_key="none", max_retries=0, timeout=120)
    schema = {"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"type": "string", "maxLength": 8}}}
    message = client.messages.create(
        model="agent", max_tokens=200, tool_choice={"type": "tool", "name": "get_weather"},
        tools=[{"name": "get_weather", "input_schema": schema}],
        messages=[{"role": "user", "content": "Weather?"}])
    assert message.stop_reason == "tool_use"
    (block,) = [b for b in message.content if b.type == "tool_use"]
    assert block.name == "get_weather"
    jsonschema.validate(block.input, schema)
