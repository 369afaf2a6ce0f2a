"""Reading a Responses API event stream the way Codex and the OpenAI SDK do, asserting its
grammar: `event:` and `data:` lines that agree, increasing sequence numbers, items opened
and closed in order, deltas that add up to the finished items, one terminal event, last."""

from __future__ import annotations

import json

import httpx

TERMINAL = ("response.completed", "response.incomplete", "response.failed")
DELTA_KEYS = {"response.output_text.delta": "text", "response.reasoning_text.delta": "text",
              "response.function_call_arguments.delta": "arguments",
              "response.custom_tool_call_input.delta": "input"}


def sse_events(text: str) -> list[dict]:
    events = []
    for frame in text.strip().split("\n\n"):
        lines = frame.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        data = json.loads(lines[1][6:])
        assert data["type"] == lines[0][7:]
        events.append(data)
    return events


def check_stream(events: list[dict]) -> dict:
    """The grammar of a response stream; returns the terminal event's response, whose
    output must equal the items rebuilt from the events."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["id"] and events[0]["response"]["status"] == "in_progress"
    terminals = [e for e in events if e["type"] in TERMINAL]
    assert len(terminals) == 1 and events[-1] is terminals[0], [e["type"] for e in events]
    items: list[dict] = []
    built: dict[int, str] = {}
    open_index = None
    for event in events[2:-1]:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert open_index is None and event["output_index"] == len(items)
            open_index = event["output_index"]
            items.append(event["item"])
            built[open_index] = ""
        elif kind in DELTA_KEYS:
            assert event["output_index"] == open_index and event["item_id"] == items[open_index]["id"]
            built[open_index] += event["delta"]
        elif kind == "response.output_item.done":
            assert event["output_index"] == open_index
            items[open_index] = event["item"]
            assert built[open_index] == item_text(event["item"]), event
            open_index = None
    assert open_index is None
    response = events[-1]["response"]
    assert response["id"] == events[0]["response"]["id"]
    assert response["output"] == items
    return response


def item_text(item: dict) -> str:
    if item["type"] in ("message", "reasoning"):
        return "".join(part.get("text", "") for part in item["content"])
    return item["arguments"] if item["type"] == "function_call" else item["input"]


def post_stream(base_url: str, body: dict, headers: dict | None = None) -> dict:
    """POST a streamed request; the checked terminal response."""
    response = httpx.post(base_url + "/v1/responses", json={**body, "stream": True}, headers=headers,
                          timeout=300)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return check_stream(sse_events(response.text))


def output_text(response: dict) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")
