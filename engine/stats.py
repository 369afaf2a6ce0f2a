"""What the engine tells its stat loggers, once per step: frozen objects, built on the event
loop from the scheduler's counters and the requests' timestamps (vLLM v1's
`metrics/stats.py` and `loggers.py` are the shape). Loggers never read the scheduler.

    step loop --record(SchedulerStats, IterationStats)--> [PrometheusStatLogger (api/metrics),
                                                           LoggingStatLogger (below)]

MLX-free and asyncio-free, like the scheduler.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("shoal")


@dataclass(frozen=True)
class SchedulerStats:
    """The scheduler's state after a step."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # 0-1, blocks in use / usable blocks
    snapshot_usage: float = 0.0  # 0-1, recurrent-state snapshots in use / all (hybrid models)


@dataclass(frozen=True)
class FinishedRequestStats:
    """One engine request, when it finishes (any reason). Intervals in seconds, monotonic;
    None where the request never reached that phase (aborted while waiting)."""

    finish_reason: str  # stop, length, abort, error
    e2e_latency: float
    num_prompt_tokens: int
    num_generation_tokens: int
    num_cached_tokens: int
    max_tokens_param: int
    n_param: int  # choices of the API request this engine request belongs to
    parent_id: str | None  # shared by those choices (None when n is 1)
    queued_time: float | None = None  # arrival -> first scheduled
    prefill_time: float | None = None  # first scheduled -> first token
    decode_time: float | None = None  # first token -> last token
    inference_time: float | None = None  # first scheduled -> last token
    mean_time_per_output_token: float | None = None  # decode time / (tokens - 1)


@dataclass(frozen=True)
class IterationStats:
    """What one step did (counts are this step's, not running totals)."""

    num_batched_tokens: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of requests admitted for the first time
    num_cached_prompt_tokens: int = 0  # of those, served from the prefix cache
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    snapshot_hits: int = 0  # admissions of a hybrid model restored from a state snapshot
    snapshot_misses: int = 0  # admissions of a hybrid model that started from no state
    snapshot_evictions: int = 0  # snapshots dropped for room or with their block
    spec_num_drafts: int = 0  # decode rows that carried draft tokens (speculative decoding)
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()  # drafts accepted at each draft position
    time_to_first_tokens: tuple[float, ...] = ()
    inter_token_latencies: tuple[float, ...] = ()
    finished: tuple[FinishedRequestStats, ...] = field(default=())


class StatLogger(Protocol):
    def record(self, scheduler: SchedulerStats, iteration: IterationStats) -> None: ...


def finished_request_stats(request, times, now: float) -> FinishedRequestStats:
    """From an engine `Request` and its stream's `RequestTimes`."""
    first, last, scheduled = times.first_token, times.last_token or times.first_token, times.scheduled
    decode = None if first is None else last - first
    params = request.params
    return FinishedRequestStats(
        finish_reason=request.finish_reason.value if request.finish_reason else "error",
        e2e_latency=now - times.arrival, num_prompt_tokens=request.num_prompt_tokens,
        num_generation_tokens=request.num_output_tokens, num_cached_tokens=request.num_cached_tokens,
        max_tokens_param=params.max_tokens, n_param=request.n, parent_id=request.parent_id,
        queued_time=None if scheduled is None else scheduled - times.arrival,
        prefill_time=None if first is None or scheduled is None else first - scheduled,
        decode_time=decode,
        inference_time=None if last is None or scheduled is None else last - scheduled,
        mean_time_per_output_token=(decode / (request.num_output_tokens - 1)
                                    if decode is not None and request.num_output_tokens > 1 else None))


class StatsCollector:
    """Turns the scheduler's running totals into per-step IterationStats; the engine adds the
    token timings and finished requests it sees while publishing a step."""

    COUNTERS = ("num_prompt_tokens", "num_cached_prompt_tokens", "num_generation_tokens",
                "num_preemptions")
    SPEC_COUNTERS = ("num_spec_drafts", "num_spec_draft_tokens", "num_spec_accepted_tokens")

    def __init__(self):
        self.ttfts: list[float] = []
        self.itls: list[float] = []
        self.finished: list[FinishedRequestStats] = []
        self._last: tuple[int, ...] = (0,) * (len(self.COUNTERS) + 5)
        self._last_spec: tuple[int, ...] = ()

    def _totals(self, scheduler) -> tuple[int, ...]:
        counters, kv = scheduler.stats, scheduler.kv
        return (*(getattr(counters, name) for name in self.COUNTERS), kv.num_cache_queries, kv.num_cache_hits,
                kv.num_snapshot_hits, kv.num_snapshot_misses, kv.snapshots.num_evictions if kv.snapshots else 0)

    def start(self, scheduler) -> None:
        self._last = self._totals(scheduler)
        self._last_spec = self._spec_totals(scheduler)

    def _spec_totals(self, scheduler) -> tuple[int, ...]:
        counters = scheduler.stats
        return (*(getattr(counters, name) for name in self.SPEC_COUNTERS), *counters.spec_accepted_per_pos)

    def step(self, scheduler, num_batched_tokens: int) -> tuple[SchedulerStats, IterationStats]:
        totals = self._totals(scheduler)
        delta = [now - before for now, before in zip(totals, self._last)]
        self._last = totals
        spec = self._spec_totals(scheduler)
        spec_delta = [now - before for now, before in zip(spec, self._last_spec)]
        self._last_spec = spec
        iteration = IterationStats(num_batched_tokens, *delta, *spec_delta[:3],
                                   spec_accepted_per_pos=tuple(spec_delta[3:]),
                                   time_to_first_tokens=tuple(self.ttfts),
                                   inter_token_latencies=tuple(self.itls), finished=tuple(self.finished))
        self.ttfts.clear()
        self.itls.clear()
        self.finished.clear()
        snapshots = scheduler.kv.snapshots
        state = SchedulerStats(len(scheduler.running), len(scheduler.waiting), scheduler.pool.usage,
                               snapshots.usage if snapshots else 0.0)
        return state, iteration


class LoggingStatLogger:
    """A one-line engine summary every `interval` seconds while there is traffic, like vLLM's:
    throughput, queue, KV usage and prefix-cache hit rate over the interval."""

    def __init__(self, interval: float = 10.0, engine_index: int = 0, clock=time.monotonic):
        self.interval = interval
        self.engine_index = engine_index
        self._clock = clock
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self._since = now
        self._prompt = self._generation = self._queries = self._hits = self._finished = 0
        self._drafted = self._accepted = 0

    def record(self, scheduler: SchedulerStats, iteration: IterationStats) -> None:
        self._prompt += iteration.num_prompt_tokens
        self._generation += iteration.num_generation_tokens
        self._queries += iteration.prefix_cache_queries
        self._hits += iteration.prefix_cache_hits
        self._finished += len(iteration.finished)
        self._drafted += iteration.spec_num_draft_tokens
        self._accepted += iteration.spec_num_accepted_tokens
        now = self._clock()
        elapsed = now - self._since
        if elapsed < self.interval:
            return
        active = self._prompt or self._generation or scheduler.num_running or scheduler.num_waiting
        if active:
            log.info("%s", self.line(scheduler, elapsed))
        self._reset(now)

    def line(self, scheduler: SchedulerStats, elapsed: float) -> str:
        hit_rate = 100.0 * self._hits / self._queries if self._queries else 0.0
        return (f"Engine {self.engine_index:03d}: Avg prompt throughput: {self._prompt / elapsed:.1f} "
                f"tokens/s, Avg generation throughput: {self._generation / elapsed:.1f} tokens/s, "
                f"Running: {scheduler.num_running} reqs, Waiting: {scheduler.num_waiting} reqs, "
                f"KV cache usage: {100.0 * scheduler.kv_cache_usage:.1f}%, "
                f"Prefix cache hit rate: {hit_rate:.1f}%, Finished: {self._finished} reqs"
                + (f", Draft acceptance rate: {100.0 * self._accepted / self._drafted:.1f}%" if self._drafted else ""))
