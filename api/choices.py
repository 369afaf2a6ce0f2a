"""The engine requests behind one API request: `n` choices per prompt, run concurrently in
the engine, their deltas merged in arrival order.

    prompt 0 -> choices 0 .. n-1, prompt 1 -> choices n .. 2n-1, ...   (OpenAI's indexing)

Closing `deltas()` early, or calling `abort()`, aborts every unfinished choice and frees
its KV blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from shoal.engine.async_engine import AsyncEngine, RequestStream
from shoal.engine.outputs import RequestOutput, TokenLogprobs
from shoal.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ChoiceDelta:
    index: int
    output: RequestOutput


class ChoiceStreams:
    def __init__(self, engine: AsyncEngine, streams: list[RequestStream], n: int):
        self.engine = engine
        self.streams = streams
        self.n = n

    @classmethod
    def start(cls, engine: AsyncEngine, prompts: Sequence[list[int]],
              params: Sequence[Sequence[SamplingParams]], request_id: str,
              cache_salt: str | None = None) -> ChoiceStreams:
        """Queue every choice; `params[p]` holds prompt p's n SamplingParams. Raises the
        engine's ValueError/EngineDeadError after aborting whatever was already queued."""
        streams: list[RequestStream] = []
        try:
            for p, (prompt, prompt_params) in enumerate(zip(prompts, params)):
                n = len(prompt_params)
                parent = f"{request_id}-p{p}" if n > 1 else None
                for sp in prompt_params:
                    streams.append(engine.add_request(prompt, sp, f"{request_id}-{len(streams)}", cache_salt,
                                                      n=n, parent_id=parent))
        except BaseException:
            cls(engine, streams, 1).abort()
            raise
        return cls(engine, streams, len(params[0]))

    @property
    def num_choices(self) -> int:
        return len(self.streams)

    @staticmethod
    def new_result() -> ChoiceResult:
        return ChoiceResult()

    def abort(self) -> None:
        """Abort every choice that has not finished (a no-op for finished ones)."""
        for stream in self.streams:
            if not stream.finished:
                self.engine.abort(stream.request_id)

    async def deltas(self) -> AsyncGenerator[ChoiceDelta, None]:
        """Every choice's deltas, merged; closing this early aborts the unfinished ones."""
        try:
            if len(self.streams) == 1:
                async for output in self.streams[0]:
                    yield ChoiceDelta(0, output)
            else:
                async for delta in self._merged():
                    yield delta
        finally:
            self.abort()

    async def _merged(self) -> AsyncGenerator[ChoiceDelta, None]:
        queue: asyncio.Queue[ChoiceDelta] = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, s, queue)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                delta = await queue.get()
                remaining -= delta.output.finished
                yield delta
        finally:
            for task in tasks:
                task.cancel()

    @staticmethod
    async def _pump(index: int, stream: RequestStream, queue: asyncio.Queue[ChoiceDelta]) -> None:
        async for output in stream:
            queue.put_nowait(ChoiceDelta(index, output))


@dataclass
class ChoiceResult:
    """One choice's deltas folded together (for non-streaming responses and usage)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    final: RequestOutput | None = None

    def add(self, delta: ChoiceDelta) -> None:
        output = delta.output
        self.text.append(output.new_text)
        self.logprobs.extend(output.logprobs)
        if output.finished:
            self.final = output
