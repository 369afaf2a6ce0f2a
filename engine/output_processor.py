"""Turns a request's new token ids into text deltas: incremental detokenization with
mlx-lm's streaming detokenizers, and stop strings matched on the decoded text.

Text that could be the start of a stop string is held back until it cannot be, so a
stop string split across tokens is never streamed out.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.engine.request import Request, RequestStatus


@dataclass
class TextDelta:
    text: str
    stop_string: str | None  # set when a stop string matched: the request must stop here


class RequestDetokenizer:
    def __init__(self, tokenizer, request: Request):
        self.detokenizer = tokenizer.detokenizer
        self.stop = request.params.stop
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""  # decoded but not yet emitted
        self.stopped = False

    def add(self, request: Request, token_ids: tuple[int, ...]) -> TextDelta:
        """Decode new tokens; on the request's last step, flush everything."""
        if self.stopped:
            return TextDelta("", None)
        for token in token_ids:
            if not self._is_stop_token(request, token):
                self.detokenizer.add_token(token)
        finished = request.status.finished
        if finished:
            self.detokenizer.finalize()
        self.pending += self.detokenizer.last_segment
        if self.stop:
            delta = self._match_stop()
            if delta is not None:
                return delta
        if finished or not self.stop:
            text, self.pending = self.pending, ""
        else:
            cut = max(len(self.pending) - self.hold, 0)
            text, self.pending = self.pending[:cut], self.pending[cut:]
        return TextDelta(text, None)

    def _match_stop(self) -> TextDelta | None:
        hits = [(i, s) for s in self.stop if (i := self.pending.find(s)) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self.stopped = True
        text, self.pending = self.pending[:index], ""
        return TextDelta(text, stop)

    @staticmethod
    def _is_stop_token(request: Request, token: int) -> bool:
        # The text of an EOS or stop token is not part of the output (vLLM's default).
        return (request.status == RequestStatus.FINISHED_STOPPED and token == request.output_token_ids[-1]
                and (token in request.eos_token_ids or token in request.params.stop_token_ids))
