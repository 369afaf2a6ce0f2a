"""One Responses API response: its output items, built from the chat service's segments,
and its stream events. The whole (non-streamed) response is built the same way.

    response.created, response.in_progress
    per item: response.output_item.added
        message:   content_part.added, output_text.delta..., output_text.done, content_part.done
        reasoning: content_part.added, reasoning_text.delta..., reasoning_text.done, content_part.done
        function_call:    function_call_arguments.delta, function_call_arguments.done
        custom_tool_call: custom_tool_call_input.delta..., custom_tool_call_input.done
    response.output_item.done (Codex reads the final text only from here)
    exactly one of response.completed, response.incomplete, response.failed

Every event carries `type` and an increasing `sequence_number`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from shoal.api.chat import ChatFinish
from shoal.api.output_parser import Segment, SegmentKind, ToolCall
from shoal.api.responses_tools import ResponseTools, ToolChoice, custom_input
from shoal.api.sse import named_event
from shoal.engine.outputs import RequestOutput


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass
class OpenItem:
    """The item being streamed: a message, reasoning or (forced) custom call growing by deltas."""

    kind: SegmentKind
    item: dict[str, Any]
    index: int
    text: list[str] = field(default_factory=list)


class ResponseWriter:
    def __init__(self, base: dict[str, Any], tools: ResponseTools, choice: ToolChoice,
                 parallel_tool_calls: bool, tokenizer: Any):
        self.base = base  # the response object's fields that do not change
        self.tools = tools
        self.choice = choice
        self.parallel_tool_calls = parallel_tool_calls
        self.tokenizer = tokenizer
        self.output: list[dict[str, Any]] = []
        self.open: OpenItem | None = None
        self.held_space = ""  # whitespace not yet worth a message of its own
        self.num_calls = 0
        self.reasoning_text: list[str] = []
        self.sequence_number = 0
        self.final: dict[str, Any] | None = None  # the finished response object

    @property
    def id(self) -> str:
        return self.base["id"]

    def response(self, status: str, **fields: Any) -> dict[str, Any]:
        return {**self.base, "status": status, "output": list(self.output), **fields}

    def event(self, event_type: str, /, **fields: Any) -> bytes:
        frame = named_event(event_type, {"type": event_type, "sequence_number": self.sequence_number,
                                         **fields})
        self.sequence_number += 1
        return frame

    def start(self) -> list[bytes]:
        opening = self.response("in_progress")
        return [self.event("response.created", response=opening),
                self.event("response.in_progress", response=opening)]

    def segments(self, segments: tuple[Segment, ...] | list[Segment]) -> list[bytes]:
        frames: list[bytes] = []
        for seg in segments:
            if seg.kind is SegmentKind.TOOL_CALL:
                frames += self._close("completed") + self._call(seg.call)
            elif seg.kind is SegmentKind.TEXT and self.choice.custom is not None:
                frames += self._delta(SegmentKind.TOOL_CALL, seg.text)  # the forced custom input
            elif seg.kind is SegmentKind.TEXT:
                frames += self._text(seg.text)
            else:
                frames += self._delta(SegmentKind.REASONING, seg.text)
        return frames

    def end(self, output: RequestOutput | None, finish: ChatFinish | None) -> list[bytes]:
        """Close the open item and send the one terminal event."""
        if finish in (ChatFinish.ERROR, ChatFinish.ABORT):
            return self.failed("server_error" if finish is ChatFinish.ERROR else "cancelled",
                               (output.error if output else None) or "The request did not finish.", output)
        incomplete = finish is ChatFinish.LENGTH
        frames = self._delta(SegmentKind.TOOL_CALL, "") if self.choice.custom and not self.output else []
        frames += self._close("incomplete" if incomplete else "completed")
        details = {"reason": "max_output_tokens"} if incomplete else None
        self.final = self.response("incomplete" if incomplete else "completed",
                                   incomplete_details=details, usage=self.usage(output))
        name = "response.incomplete" if incomplete else "response.completed"
        return frames + [self.event(name, response=self.final)]

    def failed(self, code: str, message: str, output: RequestOutput | None = None) -> list[bytes]:
        frames = self._close("incomplete")
        self.final = self.response("failed", error={"code": code, "message": message},
                                   usage=self.usage(output))
        return frames + [self.event("response.failed", response=self.final)]

    def usage(self, output: RequestOutput | None) -> dict[str, Any]:
        prompt = output.num_prompt_tokens if output else 0
        completion = output.num_output_tokens if output else 0
        reasoning = "".join(self.reasoning_text)
        num_reasoning = min(len(self.tokenizer.encode(reasoning, add_special_tokens=False)),
                            completion) if reasoning else 0
        return {"input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": output.num_cached_tokens if output else 0},
                "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": num_reasoning},
                "total_tokens": prompt + completion}

    # -- items ---------------------------------------------------------------------------

    def _text(self, text: str) -> list[bytes]:
        if (self.open is None or self.open.kind is not SegmentKind.TEXT) and not text.strip():
            self.held_space += text  # no message of whitespace alone (between calls, say)
            return []
        text, self.held_space = self.held_space + text, ""
        return self._delta(SegmentKind.TEXT, text)

    def _delta(self, kind: SegmentKind, text: str) -> list[bytes]:
        frames: list[bytes] = []
        if self.open is None or self.open.kind is not kind:
            frames += self._close("completed") + self._open(kind)
        item = self.open
        item.text.append(text)
        if kind is SegmentKind.REASONING:
            self.reasoning_text.append(text)
        if kind is SegmentKind.TOOL_CALL:
            return frames + [self.event("response.custom_tool_call_input.delta", item_id=item.item["id"],
                                        output_index=item.index, delta=text)]
        name = "response.output_text.delta" if kind is SegmentKind.TEXT else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind is SegmentKind.TEXT else {}
        return frames + [self.event(name, item_id=item.item["id"], output_index=item.index,
                                    content_index=0, delta=text, **extra)]

    def _open(self, kind: SegmentKind) -> list[bytes]:
        if kind is SegmentKind.TOOL_CALL:
            item = self._custom_item(self.choice.custom.name, self.choice.custom.namespace, "")
        elif kind is SegmentKind.TEXT:
            item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
        else:
            item = {"id": new_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [],
                    "content": [], "encrypted_content": None}
        self.open = OpenItem(kind, item, len(self.output))
        frames = [self.event("response.output_item.added", output_index=self.open.index, item=item)]
        if kind is not SegmentKind.TOOL_CALL:
            frames.append(self.event("response.content_part.added", item_id=item["id"],
                                     output_index=self.open.index, content_index=0, part=_part(kind, "")))
        return frames

    def _close(self, status: str) -> list[bytes]:
        open_item, self.open = self.open, None
        if open_item is None:
            return []
        text, item_id, index = "".join(open_item.text), open_item.item["id"], open_item.index
        ids = {"item_id": item_id, "output_index": index}
        if open_item.kind is SegmentKind.TOOL_CALL:
            item = {**open_item.item, "input": text, "status": "completed"}
            frames = [self.event("response.custom_tool_call_input.done", **ids, input=text)]
        else:
            part = _part(open_item.kind, text)
            item = {**open_item.item, "status": status, "content": [part]}
            done = "response.output_text.done" if open_item.kind is SegmentKind.TEXT else "response.reasoning_text.done"
            extra = {"logprobs": []} if open_item.kind is SegmentKind.TEXT else {}
            frames = [self.event(done, **ids, content_index=0, text=text, **extra),
                      self.event("response.content_part.done", **ids, content_index=0, part=part)]
        self.output.append(item)
        return frames + [self.event("response.output_item.done", output_index=index, item=item)]

    def _call(self, call: ToolCall) -> list[bytes]:
        if self.num_calls and self.parallel_tool_calls is False:
            return []  # one call per turn was asked for
        self.num_calls += 1
        origin = self.tools.origin(call.name)
        if origin.custom:
            text = custom_input(call.arguments)
            done = self._custom_item(origin.name, origin.namespace, text, call.id)
            field_name, prefix = "input", "response.custom_tool_call_input"
        else:
            text = call.arguments
            done = {"id": new_id("fc"), "type": "function_call", "status": "completed",
                    "call_id": f"call_{call.id}", "name": origin.name, "arguments": text}
            if origin.namespace:
                done["namespace"] = origin.namespace
            field_name, prefix = "arguments", "response.function_call_arguments"
        index = len(self.output)
        self.output.append(done)
        ids = {"item_id": done["id"], "output_index": index}
        named = {} if origin.custom else {"name": origin.name}
        return [self.event("response.output_item.added", output_index=index,
                           item={**done, field_name: "", "status": "in_progress"}),
                self.event(f"{prefix}.delta", **ids, delta=text),
                self.event(f"{prefix}.done", **ids, **named, **{field_name: text}),
                self.event("response.output_item.done", output_index=index, item=done)]

    @staticmethod
    def _custom_item(name: str, namespace: str | None, text: str, call_id: str | None = None) -> dict[str, Any]:
        item = {"id": new_id("ctc"), "type": "custom_tool_call", "status": "completed",
                "call_id": f"call_{call_id or secrets.token_hex(12)}", "name": name, "input": text}
        if namespace:
            item["namespace"] = namespace
        return item


def _part(kind: SegmentKind, text: str) -> dict[str, Any]:
    if kind is SegmentKind.TEXT:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "reasoning_text", "text": text}
