"""The Responses API (`/v1/responses`) over real HTTP, with the official `openai` SDK and raw
SSE, against the scripted agent model: reasoning, message and function_call items, the
stream's grammar, usage with prefix-cache reads, history items rendered back, hosted tools
dropped, previous_response_id, errors in OpenAI's shape, and every request Codex was
captured sending (tests/data/codex, copied from shared/codex/captured)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

pytest.register_assert_rewrite("server_util", "responses_util")
from responses_util import item_text, output_text, post_stream  # noqa: E402
from server_util import Server, metric  # noqa: E402

pytest_plugins = ["server_util"]
CAPTURED = Path(__file__).resolve().parent / "data" / "codex"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city", "strict": False,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = "What is the weather in Paris?"
NO_THINKING = {"effort": "none"}  # the template's thinking switch off: the scripted text answer


@pytest.fixture(scope="module")
def client(agent_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent_server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def test_reasoning_text_and_function_call_whole(client):
    out = client.responses.create(model="agent", input=ASK, tools=[WEATHER])
    assert out.object == "response" and out.status == "completed" and out.id.startswith("resp_")
    kinds = [item.type for item in out.output]
    assert kinds == ["reasoning", "message", "function_call"], kinds
    assert out.output[0].content[0].text == "The user wants the weather."
    assert out.output_text == "Let me check."
    call = out.output[2]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.status == "completed"
    usage = out.usage
    assert usage.output_tokens == 9 and 0 < usage.output_tokens_details.reasoning_tokens < 9  # 8 pieces, EOS
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_stream_rebuilds_the_whole_response(client, agent_server: Server):
    whole = client.responses.create(model="agent", input=ASK, tools=[WEATHER])
    streamed = post_stream(agent_server.base_url, {"model": "agent", "input": ASK, "tools": [WEATHER]})
    assert streamed["status"] == "completed"
    expected = [i.model_dump(exclude_none=True) for i in whole.output]
    assert [item_text(i) for i in streamed["output"]] == [item_text(i) for i in expected]
    assert [i["type"] for i in streamed["output"]] == [i["type"] for i in expected]
    assert streamed["usage"]["input_tokens_details"]["cached_tokens"] > 0  # the same prompt again


def test_sdk_stream_helper_and_events(client):
    with client.responses.stream(model="agent", input=ASK, tools=[WEATHER]) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.reasoning_text.delta" in types and "response.output_text.delta" in types
    assert "response.function_call_arguments.done" in types
    assert final.output_text == "Let me check." and final.output[-1].name == "get_weather"


def test_effort_none_turns_thinking_off(client):
    out = client.responses.create(model="agent", input=ASK, reasoning=NO_THINKING,
                                  instructions="Be brief.")
    assert [item.type for item in out.output] == ["message"]
    assert out.output_text == "Hello from Shoal." and out.usage.output_tokens_details.reasoning_tokens == 0
    assert out.instructions == "Be brief." and out.reasoning.effort == "none"


def test_max_output_tokens_is_incomplete(client, agent_server: Server):
    out = client.responses.create(model="agent", input=ASK, max_output_tokens=2)
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.output[0].type == "reasoning" and out.usage.output_tokens == 2
    streamed = post_stream(agent_server.base_url, {"model": "agent", "input": ASK, "max_output_tokens": 2})
    assert streamed["status"] == "incomplete"


def test_history_items_render_and_hit_the_prefix_cache(client):
    first = client.responses.create(model="agent", input=ASK, tools=[WEATHER], store=False)
    call = first.output[-1]
    history = [{"role": "user", "content": ASK}, *[i.model_dump(exclude_none=True) for i in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}]
    second = client.responses.create(model="agent", input=history, tools=[WEATHER], store=False)
    assert second.status == "completed"
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16


def test_hosted_tools_are_dropped_not_refused(client):
    out = client.responses.create(model="agent", input=ASK, reasoning=NO_THINKING,
                                  tools=[WEATHER, {"type": "web_search"}, {"type": "file_search",
                                                                             "vector_store_ids": ["x"]}])
    assert out.status == "completed" and out.output_text == "Hello from Shoal."


def test_previous_response_id_continues_a_stored_response(client, agent_server: Server):
    first = client.responses.create(model="agent", input=ASK, reasoning=NO_THINKING)
    second = client.responses.create(model="agent", input="And tomorrow?", reasoning=NO_THINKING,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.status == "completed"
    assert second.usage.input_tokens > first.usage.input_tokens + len("And tomorrow?")
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16
    assert client.responses.retrieve(first.id).id == first.id
    unstored = client.responses.create(model="agent", input=ASK, reasoning=NO_THINKING, store=False)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="agent", input="x", previous_response_id=unstored.id)
    assert caught.value.body["param"] == "previous_response_id" and unstored.id in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_previous_response_id_store_is_bounded(tiny_model_dir, tmp_path):
    from server_util import serve, tiny_args

    for server in serve([*tiny_args(tiny_model_dir), "--responses-store-size", "1"], tmp_path / "s.log"):
        body = {"model": "tiny", "input": "hi", "max_output_tokens": 2}
        ids = [httpx.post(server.url("/v1/responses"), json=body, timeout=60).json()["id"] for _ in range(2)]
        old = httpx.post(server.url("/v1/responses"), json={**body, "previous_response_id": ids[0]}, timeout=60)
        assert old.status_code == 400 and ids[0] in old.json()["error"]["message"]
        new = httpx.post(server.url("/v1/responses"), json={**body, "previous_response_id": ids[1]}, timeout=60)
        assert new.status_code == 200, new.text


@pytest.mark.parametrize("fields, param", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"truncation": "auto"}, "truncation"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "mystery"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"include": ["everything"]}, "include"),
    ({"service_tier": "gold"}, "service_tier"),
    ({"temperature": 3}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, "tool_choice.name"),
    ({"tools": [{"type": "custom", "name": "c", "format": {"type": "grammar", "syntax": "ebnf",
                                                           "definition": "x"}}]}, "tools[0].format.syntax"),
    ({"background": True}, "background"),
])
def test_bad_requests_are_400s_naming_the_parameter(agent_server: Server, fields: dict, param: str):
    body = {"model": "agent", "input": ASK, **fields}
    response = httpx.post(agent_server.url("/v1/responses"), json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "BadRequestError" and error["message"]


def test_unknown_model_and_sdk_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="agent", input="x", truncation="auto")


def test_prompt_over_the_window_fails_with_context_length_exceeded(tiny_server: Server):
    body = {"model": "tiny", "input": "long " * 400}
    response = httpx.post(tiny_server.url("/v1/responses"), json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    streamed = post_stream(tiny_server.base_url, body)
    assert streamed["status"] == "failed" and streamed["error"]["code"] == "context_length_exceeded"


def test_auth_and_metrics_cover_the_route(auth_server: Server, agent_server: Server, client):
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 2}
    assert httpx.post(auth_server.url("/v1/responses"), json=body, timeout=30).status_code == 401
    ok = httpx.post(auth_server.url("/v1/responses"), json=body, timeout=60,
                    headers={"authorization": "Bearer key-one"})
    assert ok.status_code == 200, ok.text
    before = metric(agent_server.metrics(), "http_requests_total", handler="/v1/responses", status="2xx")
    client.responses.create(model="agent", input="hi", max_output_tokens=1)
    after = metric(agent_server.metrics(), "http_requests_total", handler="/v1/responses", status="2xx")
    assert after == before + 1


@pytest.mark.parametrize("name", sorted(p.name for p in CAPTURED.glob("*.json")))
def test_every_captured_codex_request_gives_a_stream_codex_accepts(agent_server: Server, name: str):
    capture = json.loads((CAPTURED / name).read_text())
    if capture["method"] == "GET":
        response = httpx.get(agent_server.url(capture["path"]), timeout=10)
        assert response.status_code == 200 and response.json()["data"]
        return
    body = {**capture["body"], "model": "agent"}
    headers = {k: v for k, v in capture["headers"].items() if k.startswith(("x-codex", "session", "thread"))}
    if not body.get("stream"):  # the --oss warm-up
        response = httpx.post(agent_server.url(capture["path"]), json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["status"] in ("completed", "incomplete")
        return
    final = post_stream(agent_server.base_url, body, headers)
    assert final["status"] == "completed" and final["id"]
    # Codex takes the answer from output_item.done: a message, or a call it can run.
    assert any(i["type"] == "message" and output_text(final) for i in final["output"]) or \
        any(i["type"] == "function_call" for i in final["output"])
    assert final["usage"]["input_tokens"] > 10000
    assert {"cached_tokens"} <= set(final["usage"]["input_tokens_details"])


def test_codex_history_items_round_trip(agent_server: Server):
    """A later Codex turn: namespaced and custom calls and their outputs, reasoning items
    with encrypted_content, developer messages."""
    capture = json.loads((CAPTURED / "codex-exec-turn.json").read_text())["body"]
    history = [
        *capture["input"],
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Look first."}],
         "encrypted_content": "opaque"},
        {"type": "function_call", "name": "exec_command", "arguments": '{"cmd": "ls"}', "call_id": "c1"},
        {"type": "function_call_output", "call_id": "c1", "output": "README.md"},
        {"type": "function_call", "namespace": "multi_agent_v1", "name": "close_agent",
         "arguments": "{}", "call_id": "c2"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "ok"}]},
        {"type": "custom_tool_call", "name": "apply_patch", "input": "*** Begin Patch\n*** End Patch",
         "call_id": "c3"},
        {"type": "custom_tool_call_output", "call_id": "c3", "output": "Done"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Patched."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "thanks"}]},
    ]
    final = post_stream(agent_server.base_url, {**capture, "model": "agent", "input": history})
    assert final["status"] == "completed" and final["output"]
