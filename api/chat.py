"""The chat service: one surface-neutral pipeline under the OpenAI and Anthropic routes.

    surface request --(adapter)--> ChatPrompt --render()--> prompt ids --start()--> ChatRun
    ChatRun.deltas(): per choice, the engine's deltas with their text split by OutputParser
                      into text / reasoning / tool-call segments, and a neutral ChatFinish

The adapters (`openai.py`, `anthropic.py`) translate their wire formats into `ChatPrompt`
and `SamplingParams`, and `ChatDelta`s back into their own responses and stream events.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shoal.api.choices import ChoiceStreams
from shoal.api.errors import bad_request
from shoal.api.output_parser import OutputParser, Segment, SegmentKind, ToolCall
from shoal.api.structured import forced_tool_call
from shoal.api.tool_formats import ReasoningFormat, ToolFormat, starts_in_reasoning
from shoal.engine.async_engine import AsyncEngine
from shoal.engine.outputs import RequestOutput, TokenLogprobs
from shoal.engine.request import FinishReason
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.structured_output import StructuredOutput

log = logging.getLogger("shoal")
SYSTEM_REMINDER = "<system-reminder>\n{}\n</system-reminder>"


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation as chat templates take it: OpenAI-style message dicts (string
    `content`, `tool_calls`, `tool_call_id`, `reasoning_content`) and function tools."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class ChatFinish(str, enum.Enum):
    """Why a choice ended, in terms both APIs can map."""

    STOP = "stop"  # end of turn: EOS or a stop token
    STOP_SEQUENCE = "stop_sequence"  # a stop string matched
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True)
class ChatDelta:
    index: int
    segments: tuple[Segment, ...]
    output: RequestOutput  # the engine's delta: counts, finish, error
    finish: ChatFinish | None = None  # set on the last delta

    @property
    def logprobs(self) -> tuple[TokenLogprobs, ...]:
        return self.output.logprobs


@dataclass
class ChatResult:
    """One choice folded whole."""

    segments: list[Segment] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    final: RequestOutput | None = None
    finish: ChatFinish | None = None

    def add(self, delta: ChatDelta) -> None:
        for seg in delta.segments:
            last = self.segments[-1] if self.segments else None
            if last is not None and seg.kind is last.kind and seg.kind is not SegmentKind.TOOL_CALL:
                self.segments[-1] = replace(last, text=last.text + seg.text)
            else:
                self.segments.append(seg)
        self.logprobs.extend(delta.logprobs)
        if delta.output.finished:
            self.final, self.finish = delta.output, delta.finish

    def text(self, kind: SegmentKind = SegmentKind.TEXT) -> str:
        return "".join(s.text for s in self.segments if s.kind is kind)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [s.call for s in self.segments if s.call is not None]


class ChatRun:
    """The choices of one chat request, each with its own output parser."""

    def __init__(self, choices: ChoiceStreams, parsers: list[OutputParser]):
        self.choices = choices
        self.parsers = parsers

    @property
    def engine(self) -> AsyncEngine:
        return self.choices.engine

    @property
    def n(self) -> int:
        return self.choices.n

    @property
    def num_choices(self) -> int:
        return len(self.parsers)

    def abort(self) -> None:
        self.choices.abort()

    @staticmethod
    def new_result() -> ChatResult:
        return ChatResult()

    async def deltas(self) -> AsyncGenerator[ChatDelta, None]:
        async for delta in self.choices.deltas():
            parser, output = self.parsers[delta.index], delta.output
            segments = parser.feed(output.new_text)
            if output.finished:
                segments += parser.finish()
            finish = chat_finish(output, parser.num_calls) if output.finished else None
            yield ChatDelta(delta.index, tuple(segments), output, finish)


def chat_finish(output: RequestOutput, num_calls: int) -> ChatFinish:
    reason = output.finish_reason
    if output.error is not None or reason is FinishReason.ERROR:
        return ChatFinish.ERROR
    if reason is FinishReason.LENGTH:
        return ChatFinish.LENGTH
    if reason is FinishReason.ABORT:
        return ChatFinish.ABORT
    if num_calls:
        return ChatFinish.TOOL_CALLS
    return ChatFinish.STOP_SEQUENCE if isinstance(output.stop_reason, str) else ChatFinish.STOP


class ChatService:
    """Renders conversations and runs them; one per server."""

    def __init__(self, engine: AsyncEngine, tool_format: ToolFormat | None,
                 reasoning: ReasoningFormat | None, chat_template: str | None = None):
        self.engine = engine
        self.tool_format = tool_format
        self.reasoning = reasoning
        self.chat_template = chat_template

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def render(self, prompt: ChatPrompt) -> list[int]:
        """Prompt token ids, rendered off the event loop (a 12k-token agent prompt takes
        tens of milliseconds to template and tokenize)."""
        return await asyncio.to_thread(self.render_sync, prompt)

    def render_sync(self, prompt: ChatPrompt) -> list[int]:
        if not getattr(self.tokenizer, "has_chat_template", True) and self.chat_template is None:
            raise bad_request("This model has no chat template; use /v1/completions.", "messages")
        messages = template_messages(prompt.messages)
        try:
            return self._apply(prompt, messages)
        except Exception as exc:  # noqa: BLE001 - jinja raises anything the template raises
            first = exc
        # Templates that allow a system turn only first: fold later ones into user turns
        # where they stand (never hoisted: the prompt head, and so the prefix cache, stays).
        folded = fold_system_turns(messages)
        if folded != messages:
            try:
                return self._apply(prompt, folded)
            except Exception:  # noqa: BLE001
                pass
        raise bad_request(f"The chat template rejected the messages: {first}", "messages") from None

    def _apply(self, prompt: ChatPrompt, messages: list[dict]) -> list[int]:
        kwargs = dict(prompt.template_kwargs)
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        if prompt.continue_final_message:
            kwargs["continue_final_message"] = True
        ids = self.tokenizer.apply_chat_template(
            messages, tools=prompt.tools or None,
            add_generation_prompt=prompt.add_generation_prompt and not prompt.continue_final_message,
            **kwargs)
        if isinstance(ids, dict):  # some transformers versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def opens_in_reasoning(self, prompt_ids: list[int]) -> bool:
        """True when the output begins inside a think section (the prompt opened it)."""
        return self.reasoning is not None and starts_in_reasoning(self.tokenizer, prompt_ids)

    def forced_call(self, tools: list[dict] | None, name: str | None,
                    prompt_ids: list[int]) -> tuple[StructuredOutput, str]:
        """The grammar (and the field to blame) for exactly one call to tool `name` (None: any
        of `tools`) in this model's tool-call format, closing a think section the prompt opened."""
        close = self.reasoning.end if self.opens_in_reasoning(prompt_ids) else None
        return forced_tool_call(tools, name, self.tool_format, "tool_choice",
                                self.engine.structured.lark_literal, close), "tool_choice"

    def start(self, prompt_ids: list[int], params: Sequence[SamplingParams], request_id: str,
              cache_salt: str | None, tools: list[dict] | None, parse_tools: bool = True) -> ChatRun:
        """Queue the choices (raises the engine's ValueError / EngineDeadError)."""
        choices = ChoiceStreams.start(self.engine, [prompt_ids], [params], request_id, cache_salt)
        in_reasoning = self.opens_in_reasoning(prompt_ids)
        tool_format = self.tool_format if parse_tools else None
        parsers = [OutputParser(tool_format, self.reasoning, tools, in_reasoning) for _ in params]
        return ChatRun(choices, parsers)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as templates expect them: tool-call arguments as objects (clients send
    JSON strings; most templates apply `tojson` to them), as vLLM does."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_call_with_object_arguments(c) for c in calls]}
        out.append(message)
    return out


def _call_with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"] or "{}")
    except json.JSONDecodeError:
        return call  # left as the client sent it
    return {**call, "function": {**function, "arguments": arguments}}


def fold_system_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System turns after the first message, as `<system-reminder>` text appended to the
    user turn before them (or a user turn of their own), in place."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "system" or i == 0:
            out.append(message)
            continue
        reminder = SYSTEM_REMINDER.format(message.get("content") or "")
        if out and out[-1].get("role") == "user":
            out[-1] = {**out[-1], "content": f"{out[-1].get('content') or ''}\n\n{reminder}"}
        else:
            out.append({"role": "user", "content": reminder})
    return out
