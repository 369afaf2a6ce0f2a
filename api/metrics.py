"""Prometheus metrics under vLLM's names and buckets, so existing dashboards work.

The only module that imports prometheus_client. Each app owns one `CollectorRegistry`:
- gauges and token counters mirror the engine's own state and are read at scrape time by
  a custom collector (no deltas to track, nothing to drift);
- per-request histograms and `request_success` are recorded by an `engine.on_finished`
  hook, once per finished request.
Both run on the event loop, the only thread that touches the scheduler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shoal.engine.async_engine import AsyncEngine, RequestTimes
from shoal.engine.request import Request

log = logging.getLogger("shoal")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_TIME_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                        60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class EngineCollector:
    """Scrape-time view of the scheduler: queue gauges, KV usage and token counters."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.labels = [model_name]

    def collect(self) -> Iterator[Metric]:
        sched = self.engine.scheduler
        yield self._gauge("vllm:num_requests_running", "Requests in model execution batches.",
                          len(sched.running))
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be processed.",
                          len(sched.waiting))
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                          sched.pool.usage)
        stats = sched.stats
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                            stats.num_prompt_tokens)
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.",
                            stats.num_generation_tokens)
        yield self._counter("vllm:num_preemptions", "Cumulative number of preemptions.",
                            stats.num_preemptions)
        yield self._counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.",
                            sched.kv.num_cache_queries)
        yield self._counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.",
                            sched.kv.num_cache_hits)

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric(self.labels, value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric(self.labels, value)
        return family


class ServerMetrics:
    """One app's registry: the engine collector plus per-request histograms."""

    def __init__(self, engine: AsyncEngine, model_name: str, max_model_len: int):
        self.engine = engine
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        self._histograms(max_model_len)
        self.request_success = Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            ["model_name", "finished_reason"], registry=self.registry)
        engine.on_finished.append(self.on_finished)

    def _histograms(self, max_model_len: int) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(self.model_name)

        token_buckets = buckets_1_2_5(max_model_len)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Inter-token latency.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             REQUEST_TIME_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Time in the waiting queue.",
                               REQUEST_TIME_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds", "Scheduled to first token.",
                                 REQUEST_TIME_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds", "First to last token.",
                                REQUEST_TIME_BUCKETS)
        self.prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                       token_buckets)
        self.generation_tokens = histogram("vllm:request_generation_tokens",
                                           "Generated tokens per request.", token_buckets)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total", "Tokens per engine step.",
                                          ITERATION_TOKEN_BUCKETS)

    def on_finished(self, request: Request, times: RequestTimes) -> None:
        """Engine hook; it runs inside the step loop, so it must never raise."""
        try:
            self._record(request, times)
        except Exception:  # noqa: BLE001 - a metrics bug must not kill the engine
            log.exception("recording metrics for %s failed", request.request_id)

    def _record(self, request: Request, times: RequestTimes) -> None:
        now = time.monotonic()
        reason = request.finish_reason.value if request.finish_reason else "unknown"
        self.request_success.labels(self.model_name, reason).inc()
        self.e2e.observe(now - times.arrival)
        self.prompt_tokens.observe(request.num_prompt_tokens)
        self.generation_tokens.observe(request.num_output_tokens)
        if times.scheduled is not None:
            self.queue.observe(times.scheduled - times.arrival)
        if times.first_token is not None:
            self.ttft.observe(times.first_token - times.arrival)
            self.prefill.observe(times.first_token - (times.scheduled or times.arrival))
            self.decode.observe((times.last_token or times.first_token) - times.first_token)
        for gap in times.token_gaps:
            self.itl.observe(gap)
        self.drain_step_tokens()

    def drain_step_tokens(self) -> None:
        # The scheduler appends one count per step and expects its reader to empty the list.
        step_tokens = self.engine.scheduler.stats.step_tokens
        for num_tokens in step_tokens:
            self.iteration_tokens.observe(num_tokens)
        step_tokens.clear()

    def render(self) -> bytes:
        """The exposition text for GET /metrics."""
        self.drain_step_tokens()
        return generate_latest(self.registry)

    def close(self) -> None:
        if self.on_finished in self.engine.on_finished:
            self.engine.on_finished.remove(self.on_finished)
