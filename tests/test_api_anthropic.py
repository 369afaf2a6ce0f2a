"""The Anthropic Messages API over real HTTP, with the official `anthropic` SDK and raw
SSE, against the scripted agent model: thinking, text and tool_use blocks, every stop
reason, usage with prefix-cache reads, a tool round trip, errors in Anthropic's shape,
and every request Claude Code was captured sending."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import orjson
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import AGENT_MAX_MODEL_LEN, Server, metric  # noqa: E402

pytest_plugins = ["server_util"]

CAPTURED = Path(__file__).resolve().parents[2] / "shared" / "claude-code" / "captured"
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema",
                                 "type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
THINK = {"type": "adaptive"}


@pytest.fixture(scope="module")
def client(agent_server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=agent_server.base_url, api_key="unused", max_retries=0,
                               timeout=60)


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) for every frame; asserts each frame has its `event:` line."""
    events = []
    for frame in response.text.strip().split("\n\n"):
        lines = frame.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        events.append((name, data))
    return events


def post_stream(server: Server, body: dict, path: str = "/v1/messages?beta=true") -> httpx.Response:
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219",
               "x-api-key": "unused"}
    response = httpx.post(server.url(path), json={**body, "stream": True}, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return response


def check_stream_shape(events: list[tuple[str, dict]]) -> list[dict]:
    """The grammar of a message stream; returns the blocks rebuilt from their deltas."""
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    blocks: list[dict] = []
    open_index = None
    for name, data in events:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(blocks)
            block = dict(data["content_block"])
            if block["type"] == "tool_use":
                assert block["input"] == {}  # input comes only through input_json_delta
                block["partial_json"] = ""
            blocks.append(block)
            open_index = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == open_index
            delta, block = data["delta"], blocks[open_index]
            key = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}
            block[key[delta["type"]]] += delta[key[delta["type"]]]
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
    assert open_index is None
    for block in blocks:
        if block["type"] == "tool_use":
            block["input"] = json.loads(block.pop("partial_json"))
    return blocks


def test_thinking_text_and_tool_use_whole(client):
    out = client.messages.create(model="agent", max_tokens=100, messages=ASK, tools=[WEATHER_TOOL],
                                 thinking=THINK)
    assert out.type == "message" and out.role == "assistant" and out.id.startswith("msg_")
    assert [b.type for b in out.content] == ["thinking", "text", "tool_use"]
    assert out.content[0].thinking == "The user wants the weather."
    assert out.content[1].text == "Let me check."
    call = out.content[2]
    assert call.id.startswith("toolu_") and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert out.stop_reason == "tool_use" and out.stop_sequence is None
    assert out.usage.output_tokens == 9  # 8 script pieces + EOS
    assert out.usage.input_tokens > 0


def test_stream_events_rebuild_the_whole_message(client, agent_server: Server):
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": ASK, "tools": [WEATHER_TOOL],
            "thinking": THINK}
    events = sse_events(post_stream(agent_server, body))
    blocks = check_stream_shape(events)
    assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use"]
    assert blocks[1]["text"] == "Let me check." and blocks[2]["input"] == {"city": "Paris"}
    assert not any("<tool_call>" in b.get("text", "") or "<think>" in b.get("text", "") for b in blocks)
    start = events[0][1]["message"]
    assert start["model"] == "claude-sonnet-4-5" and start["content"] == []
    final = [d for n, d in events if n == "message_delta"][0]
    assert final["delta"]["stop_reason"] == "tool_use"
    usage = final["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == start["usage"]["input_tokens"]
    # The SDK's own accumulator agrees with the non-streamed answer.
    with client.messages.stream(model="agent", max_tokens=100, messages=ASK, tools=[WEATHER_TOOL],
                                thinking=THINK) as stream:
        message = stream.get_final_message()
    whole = client.messages.create(model="agent", max_tokens=100, messages=ASK, tools=[WEATHER_TOOL],
                                   thinking=THINK)
    strip = lambda m: [{k: v for k, v in b.model_dump().items() if k not in ("id", "signature")}
                       for b in m.content]
    assert strip(message) == strip(whole)


def test_end_turn_without_thinking_and_stop_sequence(client):
    out = client.messages.create(model="agent", max_tokens=100, system="Be brief.", messages=ASK)
    assert [b.type for b in out.content] == ["text"] and out.content[0].text == "Hello from Shoal."
    assert out.stop_reason == "end_turn"
    out = client.messages.create(model="agent", max_tokens=100, messages=ASK, stop_sequences=[" Shoal"])
    assert out.content[0].text == "Hello from" and out.stop_reason == "stop_sequence"
    assert out.stop_sequence == " Shoal"


def test_max_tokens_stop_and_huge_max_tokens_is_clamped(client):
    out = client.messages.create(model="agent", max_tokens=2, messages=ASK, thinking=THINK)
    assert out.stop_reason == "max_tokens" and out.usage.output_tokens == 2
    assert [b.type for b in out.content] == ["thinking"]
    out = client.messages.create(model="agent", max_tokens=10**6, messages=ASK)
    assert out.stop_reason == "end_turn"


def test_tool_round_trip_renders_history_and_hits_the_prefix_cache(client):
    first = client.messages.create(model="agent", max_tokens=100, messages=ASK, tools=[WEATHER_TOOL],
                                   thinking=THINK)
    call = first.content[2]
    history = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 C",
                    "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Thanks."}]}]
    second = client.messages.create(model="agent", max_tokens=100, messages=history,
                                    tools=[WEATHER_TOOL], thinking=THINK)
    assert second.stop_reason == "tool_use"
    total = second.usage.input_tokens + second.usage.cache_read_input_tokens
    first_total = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    assert total > first_total + len("Sunny, 24 C")
    assert second.usage.cache_read_input_tokens >= (first_total // 16 - 1) * 16
    counted = client.messages.count_tokens(model="agent", messages=history, tools=[WEATHER_TOOL],
                                           thinking=THINK)
    assert counted.input_tokens == total


def test_system_turns_in_place_and_billing_header_dropped(client, agent_server: Server):
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=abc;"},
              {"type": "text", "text": "You are helpful.", "cache_control": {"type": "ephemeral"}}]
    messages = [*ASK, {"role": "system", "content": "Reminder: be brief."}]
    count = lambda sys: client.messages.count_tokens(model="agent", system=sys, messages=messages).input_tokens
    assert count(system) == count(system[1:])  # the billing line costs nothing
    other = [{**system[0], "text": "x-anthropic-billing-header: cc_version=2; cch=def;"}, system[1]]
    first = client.messages.create(model="agent", max_tokens=10, system=system, messages=messages)
    second = client.messages.create(model="agent", max_tokens=10, system=other, messages=messages)
    assert second.usage.cache_read_input_tokens >= first.usage.input_tokens - 16
    tokens = httpx.post(agent_server.url("/tokenize"), json={"messages": [
        {"role": "system", "content": "You are helpful."}, *messages],
        "chat_template_kwargs": {"enable_thinking": False}}).json()["tokens"]
    assert count(system) == len(tokens)  # rendered in place, exactly as the OpenAI side would


def test_errors_have_anthropic_shape(agent_server: Server):
    def error(body: dict | bytes, status: int, kind: str, path: str = "/v1/messages") -> str:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        response = httpx.post(agent_server.url(path), content=content,
                              headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == status, response.text
        data = response.json()
        assert data["type"] == "error" and data["error"]["type"] == kind
        return data["error"]["message"]

    base = {"model": "agent", "max_tokens": 10, "messages": ASK}
    assert "does not exist" in error({**base, "model": "gpt-4"}, 404, "not_found_error")
    error(b"{not json", 400, "invalid_request_error")
    assert "max_tokens" in error({**base, "max_tokens": None}, 400, "invalid_request_error")
    assert "messages" in error({**base, "messages": []}, 400, "invalid_request_error")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    assert "image" in error({**base, "messages": [{"role": "user", "content": [image]}]}, 400,
                            "invalid_request_error")
    # ...but a tool's picture (Claude Code reading a PNG) becomes a note, not a failed turn.
    turn = [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read",
                                                     "input": {"file_path": "a.png"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}]}]
    assert httpx.post(agent_server.url("/v1/messages"), json={**base, "messages": turn},
                      timeout=30).status_code == 200
    assert "nope" in error({**base, "tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "nope"}},
                           400, "invalid_request_error")
    long = [{"role": "user", "content": "x" * AGENT_MAX_MODEL_LEN}]
    message = error({**base, "messages": long}, 400, "invalid_request_error")
    assert message.startswith("prompt is too long: ") and message.endswith(
        f" tokens > {AGENT_MAX_MODEL_LEN - 1} maximum")
    assert "Not Found" in error({}, 404, "not_found_error", "/v1/messages/nope")
    ok = httpx.post(agent_server.url("/v1/messages"), json=base, timeout=30)
    assert ok.status_code == 200  # and the server keeps serving


def test_sdk_raises_its_own_exceptions(client):
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="gpt-4", max_tokens=5, messages=ASK)
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        client.messages.create(model="agent", max_tokens=5,
                               messages=[{"role": "user", "content": "y" * AGENT_MAX_MODEL_LEN}])


def test_auth_errors_in_anthropic_shape(auth_server: Server):
    body = {"model": "tiny", "max_tokens": 2, "messages": ASK}
    response = httpx.post(auth_server.url("/v1/messages"), json=body, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    for headers in ({"x-api-key": "key-one"}, {"authorization": "Bearer key-two"}):
        assert httpx.post(auth_server.url("/v1/messages"), json=body, headers=headers,
                          timeout=60).status_code == 200


@pytest.mark.parametrize("name", sorted(p.name for p in CAPTURED.glob("*.json")))
def test_every_captured_request_is_answered(agent_server: Server, name: str):
    capture = json.loads((CAPTURED / name).read_text())
    path, method = capture["path"], capture["method"]
    headers = {k: v for k, v in capture["headers"].items()
               if k.lower() in ("anthropic-version", "anthropic-beta", "x-api-key", "authorization", "x-app")}
    if method == "HEAD":
        response = httpx.head(agent_server.url(path), timeout=10)
        assert response.status_code in (200, 404)
        return
    body = capture["body"]
    if path.startswith("/v1/messages/count_tokens"):
        response = httpx.post(agent_server.url(path), json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["input_tokens"] > 0
        return
    if body.get("stream"):
        blocks = check_stream_shape(sse_events(post_stream(agent_server, body, path)))
        assert blocks and all(b["type"] in ("text", "thinking", "tool_use") for b in blocks)
        return
    response = httpx.post(agent_server.url(path), json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "message" and response.json()["stop_reason"] is not None


def test_prefix_hits_counted_in_metrics(client, agent_server: Server):
    before = metric(agent_server.metrics(), "vllm:prefix_cache_hits_total")
    messages = [{"role": "user", "content": "the same long question " * 10}]
    client.messages.create(model="agent", max_tokens=5, messages=messages)
    again = client.messages.create(model="agent", max_tokens=5, messages=messages)
    after = metric(agent_server.metrics(), "vllm:prefix_cache_hits_total")
    assert again.usage.cache_read_input_tokens > 0
    assert after - before >= again.usage.cache_read_input_tokens


def test_pings_fill_silence_without_cancelling_the_read():
    import asyncio

    from shoal.api.anthropic import with_pings

    async def slow():
        for delay in (0.25, 0.0, 0.25):
            await asyncio.sleep(delay)
            yield delay

    async def gather():
        return [item async for item in with_pings(slow(), 0.1)]

    items = asyncio.run(gather())
    assert [i for i in items if i is not None] == [0.25, 0.0, 0.25]  # nothing lost to a timeout
    assert items.count(None) >= 3 and items[0] is None  # silence before the first item is filled


def test_pings_while_the_parser_holds_a_tool_call_back():
    import asyncio

    from shoal.api.anthropic import MessageWriter, stream_events
    from shoal.api.chat import ChatDelta, ChatRun
    from shoal.api.output_parser import OutputParser
    from shoal.api.tool_formats import load_tool_format
    from shoal.engine.outputs import RequestOutput

    class TrickleRun(ChatRun):  # a token every 20 ms, all inside one long tool call
        def __init__(self):
            self.parsers = [OutputParser(load_tool_format("hermes"), None)]

        async def deltas(self):
            pieces = ["<tool_call>", *(['{"name": "f", "arguments": {"x": "'] + ["a"] * 20 + ['"}}']),
                      "</tool_call>"]
            for i, piece in enumerate(pieces):
                await asyncio.sleep(0.02)
                last = i == len(pieces) - 1
                out = RequestOutput("r", (1,), piece, last, None, 3, 0, i + 1)
                yield ChatDelta(0, tuple(self.parsers[0].feed(piece)), out)

    async def frames():
        return [f async for f in stream_events(TrickleRun(), MessageWriter("m", "x", 3), 0.1)]

    out = asyncio.run(frames())
    names = [f.split(b"\n")[0] for f in out]
    first_block = names.index(b"event: content_block_start")
    assert names[1:first_block].count(b"event: ping") >= 2  # 0.5 s of held-back output
