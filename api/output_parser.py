"""Splits a choice's streamed text into answer text, reasoning and tool calls.

    "<think>plan</think>\\n\\nLet me look.<tool_call>{...}</tool_call>"
        -> reasoning "plan", text "Let me look.", tool call {...}

It works on decoded text, fed delta by delta. Any tail that could be the start of a marker
is held back until the next delta settles it, so markup split across tokens never reaches
the text; a call is parsed once its end marker arrives (or at the end of the output for
formats without one). A call that does not parse is given back as text: nothing the model
wrote is dropped.
"""

from __future__ import annotations

import enum
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from shoal.api.tool_formats import ReasoningFormat, ToolFormat

log = logging.getLogger("shoal")


class SegmentKind(str, enum.Enum):
    TEXT = "text"
    REASONING = "reasoning"
    TOOL_CALL = "tool_call"


@dataclass(frozen=True)
class ToolCall:
    id: str  # surface-neutral; the APIs prefix it (call_..., toolu_...)
    name: str
    arguments: str  # a JSON object, as text

    @classmethod
    def from_parsed(cls, call: Any) -> ToolCall:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError(f"not a tool call: {call!r}")
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = json.loads(arguments or "{}")
        if not isinstance(arguments, dict):
            raise ValueError(f"tool arguments must be an object, got {arguments!r}")
        return cls(secrets.token_hex(12), call["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass(frozen=True)
class Segment:
    kind: SegmentKind
    text: str = ""
    call: ToolCall | None = None


class _State(enum.Enum):
    TEXT = 0
    REASONING = 1
    TOOL = 2


def held_tail(text: str, markers: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


class OutputParser:
    def __init__(self, tool: ToolFormat | None, reasoning: ReasoningFormat | None,
                 tools: list[dict] | None = None, in_reasoning: bool = False):
        self.tool = tool
        self.reasoning = reasoning
        self.tools = tools
        self.state = _State.REASONING if in_reasoning and reasoning else _State.TEXT
        self.buffer = ""
        self.strip_next = self.state is _State.REASONING  # whitespace after a marker is dropped
        self.started = False  # any text or reasoning given out yet (llama3's bare-JSON check)
        self.num_calls = 0
        self.call_marker = ""  # the marker that opened the current call ("" for bare JSON)
        self._out: list[Segment] = []

    def feed(self, text: str) -> list[Segment]:
        self.buffer += text
        while self._step():
            pass
        return self._take()

    def finish(self) -> list[Segment]:
        """Flush at the end of the output: held text, unfinished reasoning, a call that
        runs to the end (or was cut off)."""
        if self.state is _State.TOOL:
            self._emit_calls(self.buffer, closed=False)
        else:
            kind = SegmentKind.REASONING if self.state is _State.REASONING else SegmentKind.TEXT
            self._emit(kind, self.buffer)
        self.buffer = ""
        self.state = _State.TEXT
        return self._take()

    def _step(self) -> bool:
        """Consume what the buffer settles; True if the state changed (go again)."""
        if self.state is _State.TEXT:
            return self._step_text()
        if self.state is _State.REASONING:
            return self._step_until(self.reasoning.end, SegmentKind.REASONING)
        if not self.tool.end:
            return False  # runs to the end of the output
        index = self.buffer.find(self.tool.end)
        if index < 0:
            return False
        parsed = self._emit_calls(self.buffer[:index], closed=True)
        self.buffer = self.buffer[index + len(self.tool.end):]
        self.state, self.strip_next = _State.TEXT, parsed
        return True

    def _step_text(self) -> bool:
        if self.tool is not None and self.tool.bare_json and not self.started:
            stripped = self.buffer.lstrip()
            if not stripped:
                return False  # only whitespace so far: wait for the first real character
            if stripped.startswith("{"):
                self.buffer = stripped
                self.state, self.call_marker = _State.TOOL, ""
                return True
        markers = self._text_markers()
        hits = [(i, m) for m in markers if (i := self.buffer.find(m)) >= 0]
        if hits:
            index, marker = min(hits)
            self._emit(SegmentKind.TEXT, self.buffer[:index])
            self.buffer = self.buffer[index + len(marker):]
            is_reasoning = self.reasoning is not None and marker == self.reasoning.start
            self.call_marker = "" if is_reasoning else marker
            self._enter(_State.REASONING if is_reasoning else _State.TOOL)
            return True
        keep = held_tail(self.buffer, markers)
        self._emit(SegmentKind.TEXT, self.buffer[:len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _step_until(self, end: str, kind: SegmentKind) -> bool:
        index = self.buffer.find(end)
        if index >= 0:
            self._emit(kind, self.buffer[:index])
            self.buffer = self.buffer[index + len(end):]
            self._enter(_State.TEXT)
            return True
        keep = held_tail(self.buffer, [end])
        self._emit(kind, self.buffer[:len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _text_markers(self) -> list[str]:
        markers = []
        if self.reasoning is not None and not self.started:  # thinking comes first, or not at all
            markers.append(self.reasoning.start)
        if self.tool is not None and self.tool.start:
            markers.append(self.tool.start)
        return markers

    def _enter(self, state: _State) -> None:
        self.state = state
        self.strip_next = True

    def _emit(self, kind: SegmentKind, text: str) -> None:
        if self.strip_next:  # the newlines templates put after a marker; indentation stays
            text = text.lstrip("\r\n")
        if not text:
            return
        self.strip_next = False
        self.started = True
        last = self._out[-1] if self._out else None
        if last is not None and last.kind is kind:
            self._out[-1] = Segment(kind, last.text + text)
        else:
            self._out.append(Segment(kind, text))

    def _emit_calls(self, body: str, closed: bool) -> bool:
        """The calls in `body`, or `body` back as text if it does not parse; True if parsed."""
        try:
            parsed = self.tool.parse(body, self.tools)
            calls = [ToolCall.from_parsed(c) for c in (parsed if isinstance(parsed, list) else [parsed])]
            if not calls:
                raise ValueError("no call")
        except Exception as exc:  # noqa: BLE001 - parsers raise anything; the text is kept
            log.warning("unparsable %s tool call (%s: %s); returned as text",
                        self.tool.name, type(exc).__name__, exc)
            self.strip_next = False
            self._emit(SegmentKind.TEXT, self.call_marker + body + (self.tool.end if closed else ""))
            return False
        self.started = True
        self.num_calls += len(calls)
        self._out.extend(Segment(SegmentKind.TOOL_CALL, call=c) for c in calls)
        return True

    def _take(self) -> list[Segment]:
        out, self._out = self._out, []
        return out
