"""Engine outputs -> OpenAI response objects: chat and text completions, whole or as
stream chunks, with logprobs (token strings included), tool calls, reasoning and usage.

A renderer is made per API request; it knows the response id, model name and options,
and (for completions) each choice's running text offset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from shoal.api.chat import ChatDelta, ChatFinish, ChatResult
from shoal.api.choices import ChoiceDelta, ChoiceResult
from shoal.api.output_parser import Segment, SegmentKind, ToolCall
from shoal.api.prompts import Prompt
from shoal.api.sampling import LogprobsRequest
from shoal.engine.outputs import RequestOutput, TokenLogprobs

MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps the same way


class TokenTexts:
    """Decoded text of single tokens, cached for one response."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


def usage(finals: Sequence[RequestOutput | None], n: int) -> dict[str, Any]:
    """OpenAI usage: each prompt counted once (from its first choice), every choice's tokens."""
    firsts = [f for f in finals[::n] if f is not None]
    prompt = sum(f.num_prompt_tokens for f in firsts)
    completion = sum(f.num_output_tokens for f in finals if f is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(f.num_cached_tokens for f in firsts)}}


def finish_fields(output: RequestOutput | None, finish: ChatFinish | None = None) -> dict[str, Any]:
    if output is None or not output.finished:
        return {"finish_reason": None}
    reason = output.finish_reason.value if output.finish_reason else None
    if finish is ChatFinish.TOOL_CALLS:
        reason = "tool_calls"
    return {"finish_reason": reason, "stop_reason": output.stop_reason}


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out = {"id": f"call_{call.id}", "type": "function",
           "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index, **out}


class Renderer:
    """What chat and completions share: the envelope around choices."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, response_id: str, model: str, tokenizer: Any, logprobs: LogprobsRequest):
        self.response_id = response_id
        self.model = model
        self.created = int(time.time())
        self.token_text = TokenTexts(tokenizer)
        self.logprobs = logprobs

    def envelope(self, object_name: str, choices: list[dict], usage_: dict | None) -> dict:
        body = {"id": self.response_id, "object": object_name, "created": self.created,
                "model": self.model, "choices": choices}
        if usage_ is not None:
            body["usage"] = usage_
        return body

    def chunk(self, choices: list[dict], usage_: dict | None = None) -> dict:
        return self.envelope(self.chunk_object_name, choices, usage_)

    def response(self, results: Sequence[ChoiceResult], usage_: dict) -> dict:
        choices = [self.choice(i, r) for i, r in enumerate(results)]
        return self.envelope(self.object_name, choices, usage_)

    def opening(self, index: int) -> dict | None:
        """A choice's first stream chunk, sent before any token; None for none."""
        return None

    def delta(self, delta: Any) -> dict | None:
        """A stream chunk's choice for one delta; None when there is nothing to send."""
        raise NotImplementedError

    def choice(self, index: int, result: Any) -> dict:
        raise NotImplementedError


class ChatRenderer(Renderer):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, response_id: str, model: str, tokenizer: Any, logprobs: LogprobsRequest):
        super().__init__(response_id, model, tokenizer, logprobs)
        self.num_calls: dict[int, int] = {}  # choice -> tool calls streamed so far

    def opening(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, delta: ChatDelta) -> dict | None:
        body = self._delta_fields(delta.index, delta.segments)
        if not (body or delta.logprobs or delta.output.finished):
            return None
        return {"index": delta.index, "delta": body, "logprobs": self._logprobs(delta.logprobs),
                **finish_fields(delta.output, delta.finish)}

    def _delta_fields(self, index: int, segments: Sequence[Segment]) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for seg in segments:
            if seg.kind is SegmentKind.TOOL_CALL:
                number = self.num_calls.get(index, 0)
                self.num_calls[index] = number + 1
                body.setdefault("tool_calls", []).append(tool_call_json(seg.call, number))
            else:
                key = "content" if seg.kind is SegmentKind.TEXT else "reasoning_content"
                body[key] = body.get(key, "") + seg.text
        return body

    def choice(self, index: int, result: ChatResult) -> dict:
        calls = result.tool_calls
        text = result.text()
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if reasoning := result.text(SegmentKind.REASONING):
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [tool_call_json(c) for c in calls]
        return {"index": index, "message": message, "logprobs": self._logprobs(result.logprobs),
                **finish_fields(result.final, result.finish)}

    def _logprobs(self, entries: Sequence[TokenLogprobs]) -> dict | None:
        if not self.logprobs.enabled:
            return None
        return {"content": [self._entry(e) for e in entries]}

    def _entry(self, entry: TokenLogprobs) -> dict:
        top = [self._token(t, lp) for t, lp in entry.top[:self.logprobs.top]]
        return {**self._token(entry.token_id, entry.logprob), "top_logprobs": top}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode())}


class CompletionRenderer(Renderer):
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, response_id: str, model: str, tokenizer: Any, logprobs: LogprobsRequest,
                 prompts: Sequence[Prompt], n: int, echo: bool):
        super().__init__(response_id, model, tokenizer, logprobs)
        self.echo_texts = [self._echo(p, tokenizer) if echo else "" for p in prompts]
        self.n = n
        self.offsets: dict[int, int] = {}  # choice -> text offset of its next token

    @staticmethod
    def _echo(prompt: Prompt, tokenizer: Any) -> str:
        return prompt.text if prompt.text is not None else tokenizer.decode(prompt.token_ids)

    def opening(self, index: int) -> dict | None:
        echo = self.echo_texts[index // self.n]
        return {"index": index, "text": echo, "logprobs": None, "finish_reason": None} if echo else None

    def delta(self, delta: ChoiceDelta) -> dict | None:
        index, output = delta.index, delta.output
        if not (output.new_text or output.logprobs or output.finished):
            return None
        return {"index": index, "text": output.new_text,
                "logprobs": self._logprobs(index, output.logprobs), **finish_fields(output)}

    def choice(self, index: int, result: ChoiceResult) -> dict:
        text = self.echo_texts[index // self.n] + "".join(result.text)
        return {"index": index, "text": text, "logprobs": self._logprobs(index, result.logprobs),
                **finish_fields(result.final)}

    def _logprobs(self, index: int, entries: Sequence[TokenLogprobs]) -> dict | None:
        if not self.logprobs.enabled:
            return None
        offset = self.offsets.get(index, len(self.echo_texts[index // self.n]))
        tokens, offsets = [], []
        for entry in entries:
            tokens.append(self.token_text(entry.token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        self.offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": [max(e.logprob, MIN_LOGPROB) for e in entries],
                "top_logprobs": [self._top(e) for e in entries], "text_offset": offsets}

    def _top(self, entry: TokenLogprobs) -> dict[str, float]:
        return {self.token_text(t): max(lp, MIN_LOGPROB) for t, lp in entry.top[:self.logprobs.top]}
