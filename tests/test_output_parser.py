"""The streaming output parser: tool calls and reasoning split out of decoded text, for the
hermes/qwen3 JSON, qwen3-coder XML, llama3 JSON and mistral formats. Every output is fed
whole, one character at a time (a byte tokenizer's token boundaries) and cut at every
single boundary; each way must give the same segments, with no markup in the text."""

from __future__ import annotations

import json

import pytest

from shoal.api.output_parser import OutputParser, Segment, SegmentKind, held_tail
from shoal.api.tool_formats import ReasoningFormat, detect_tool_format, load_tool_format

THINK = ReasoningFormat("<think>", "</think>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
PARIS = {"city": "Paris"}


def run(parser_factory, pieces: list[str]) -> list[tuple[str, object]]:
    """Feed `pieces`, then finish; segments merged by kind, calls as (name, arguments)."""
    parser = parser_factory()
    segments: list[Segment] = []
    for piece in pieces:
        segments += parser.feed(piece)
    segments += parser.finish()
    merged: list[tuple[str, object]] = []
    for seg in segments:
        if seg.kind is SegmentKind.TOOL_CALL:
            merged.append(("call", (seg.call.name, json.loads(seg.call.arguments))))
        elif merged and merged[-1][0] == seg.kind.value:
            merged[-1] = (seg.kind.value, merged[-1][1] + seg.text)
        else:
            merged.append((seg.kind.value, seg.text))
    return merged


def all_splits(text: str) -> list[list[str]]:
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


FORMATS = {
    "hermes": (
        'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>\nDone.',
        [("text", "Let me check."), ("call", ("get_weather", PARIS)),
         ("call", ("get_weather", {"city": "Rome", "days": 2})), ("text", "Done.")]),
    "qwen3_coder": (
        "Checking <tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call> after",
        [("text", "Checking "), ("call", ("get_weather", {"city": "Paris", "days": 3})), ("text", " after")]),
    "llama3_json": (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        [("call", ("get_weather", PARIS))]),
    "mistral": (
        'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        [("text", "Sure. "), ("call", ("get_weather", PARIS))]),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_token_boundary_gives_the_same_calls(name: str):
    text, expected = FORMATS[name]
    fmt = load_tool_format(name)
    for pieces in all_splits(text):
        assert run(lambda: OutputParser(fmt, THINK, TOOLS), pieces) == expected, pieces


def test_mistral_json_list_and_llama3_python_tag():
    mistral = load_tool_format("mistral")
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "b", "arguments": {}}]'
    for pieces in all_splits(text):
        assert run(lambda: OutputParser(mistral, None), pieces) == [
            ("call", ("get_weather", PARIS)), ("call", ("b", {}))]
    llama3 = load_tool_format("llama3_json")
    text = 'Here: <|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    for pieces in all_splits(text):
        assert run(lambda: OutputParser(llama3, None), pieces) == [
            ("text", "Here: "), ("call", ("a", {"x": 1})), ("call", ("b", {}))]


def test_llama3_plain_text_is_not_a_call():
    llama3 = load_tool_format("llama3_json")
    for text in ("The answer is {not json}.", "  {broken json", "plain"):
        assert run(lambda: OutputParser(llama3, None), list(text)) == [("text", text.lstrip())]


def test_reasoning_then_text_then_call_at_every_boundary():
    fmt = load_tool_format("hermes")
    text = '<think>\nI should call it.\n</think>\n\nOK.<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    expected = [("reasoning", "I should call it.\n"), ("text", "OK."), ("call", ("get_weather", {}))]
    for pieces in all_splits(text):
        assert run(lambda: OutputParser(fmt, THINK, TOOLS), pieces) == expected, pieces


def test_prompt_opened_reasoning_and_unterminated_reasoning():
    for pieces in all_splits("plan</think>answer"):
        assert run(lambda: OutputParser(None, THINK, in_reasoning=True), pieces) == [
            ("reasoning", "plan"), ("text", "answer")]
    assert run(lambda: OutputParser(None, THINK), ["<think>cut off"]) == [("reasoning", "cut off")]


def test_unparsable_or_unfinished_call_is_returned_as_text():
    fmt = load_tool_format("hermes")
    broken = "a<tool_call>{not json}</tool_call>b"
    assert run(lambda: OutputParser(fmt, None), list(broken)) == [("text", broken)]
    cut = 'x<tool_call>\n{"name": "get_weather", "argu'
    assert run(lambda: OutputParser(fmt, None), list(cut)) == [("text", cut)]


def test_text_after_calls_and_literal_think_markers_are_kept():
    fmt = load_tool_format("hermes")
    text = 'Run:<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\n    indented <think>literal</think>'
    for pieces in all_splits(text):
        assert run(lambda: OutputParser(fmt, THINK), pieces) == [
            ("text", "Run:"), ("call", ("f", {})), ("text", "    indented <think>literal</think>")]
    bad = "x <tool_call>{bad</tool_call> y"
    assert run(lambda: OutputParser(fmt, THINK), list(bad)) == [("text", bad)]


def test_marker_prefix_that_is_not_a_marker_is_released():
    fmt = load_tool_format("hermes")
    parser = OutputParser(fmt, THINK)
    assert parser.feed("a <tool") == [Segment(SegmentKind.TEXT, "a ")]  # "<tool" held back
    assert parser.feed("box> b") == [Segment(SegmentKind.TEXT, "<toolbox> b")]
    assert parser.finish() == []


def test_held_tail():
    assert held_tail("abc<tool_ca", ["<tool_call>"]) == 8
    assert held_tail("abc<", ["<tool_call>", "<think>"]) == 1
    assert held_tail("abc", ["<tool_call>"]) == 0
    assert held_tail("<tool_call>", ["<tool_call>"]) == 0  # whole markers are found, not held


def test_detection_and_unknown_names():
    class NoTools:
        tool_parser = None
        chat_template = "{{ '<|python_tag|>' }}"

    assert detect_tool_format(NoTools(), None).name == "llama3_json"
    assert detect_tool_format(NoTools(), "none") is None
    assert detect_tool_format(NoTools(), "hermes").start == "<tool_call>"
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        load_tool_format("no_such_parser")
