"""Tool calls and reasoning on the OpenAI API, with the official `openai` SDK against the
scripted agent model: parsed `tool_calls` with ids and `finish_reason: "tool_calls"`,
`reasoning_content`, streamed deltas free of markup, `chat_template_kwargs`, a tool round
trip through the chat template, and `tool_choice: "none"`."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import Server  # noqa: E402

pytest_plugins = ["server_util"]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def client(agent_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent_server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


def test_tool_call_and_reasoning_whole(client):
    out = client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    message = choice.message
    assert message.content == "Let me check."
    assert message.model_extra["reasoning_content"] == "The user wants the weather."
    (call,) = message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_deltas_carry_no_markup_and_match_whole(client):
    chunks = list(client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS, stream=True,
                                                 n=2, temperature=0))
    for index in (0, 1):
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].index == index]
        content = "".join(d.content or "" for d in deltas)
        reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        calls = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert content == "Let me check." and reasoning == "The user wants the weather."
        assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            (0, "get_weather", {"city": "Paris"})]
        assert calls[0].id.startswith("call_")
        finishes = [c.choices[0].finish_reason for c in chunks
                    if c.choices and c.choices[0].index == index and c.choices[0].finish_reason]
        assert finishes == ["tool_calls"]


def test_chat_template_kwargs_turn_thinking_off(client):
    out = client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS, extra_body=NO_THINKING)
    assert out.choices[0].message.content == "Hello from Shoal."
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.tool_calls is None
    assert "reasoning_content" not in out.choices[0].message.model_extra


def test_tool_round_trip_through_the_template(client, agent_server: Server):
    first = client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": first.choices[0].message.content,
                      "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    second = client.chat.completions.create(model="agent", messages=history, tools=TOOLS)
    assert second.choices[0].finish_reason == "tool_calls"
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    rendered = httpx.post(agent_server.url("/tokenize"), json={
        "messages": history, "tools": TOOLS, "return_token_strs": False}).json()
    text = httpx.post(agent_server.url("/detokenize"), json={"tokens": rendered["tokens"]}).json()["prompt"]
    # Arguments sent as a JSON string are rendered once, as an object, not as a quoted string.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nSunny, 24 C\n</tool_response>" in text
    assert rendered["count"] == second.usage.prompt_tokens


def test_tool_choice_none_leaves_the_markup_as_text(client):
    out = client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS, tool_choice="none")
    message = out.choices[0].message
    assert message.tool_calls is None and out.choices[0].finish_reason == "stop"
    assert message.content.startswith("Let me check.<tool_call>")


def test_continue_final_message(client):
    out = client.chat.completions.create(
        model="agent", messages=[*ASK, {"role": "assistant", "content": "Partial"}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False}, max_tokens=3)
    assert out.choices[0].finish_reason in ("stop", "length")
