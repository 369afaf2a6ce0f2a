"""Prometheus metrics under vLLM's names, labels and buckets, so existing dashboards and
scrape configs work unchanged.

The only module that imports prometheus_client. Each app owns one `CollectorRegistry`, fed
by `PrometheusStatLogger`, one of the engine's stat loggers: it sees only the frozen stats
the engine pushes after each step (engine/stats.py), never the scheduler. Every labelled
series exists from startup (at zero), so `rate()` sees the first increase. Process metrics
(`process_*`) come from prometheus_client's collector; `http_requests_total` from the
`HttpMetricsMiddleware` below.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               ProcessCollector, disable_created_metrics, generate_latest)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.engine.stats import FinishedRequestStats, IterationStats, SchedulerStats

log = logging.getLogger("shoal")
disable_created_metrics()  # no `_created` series: vLLM's exposition has none either

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


TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
N_BUCKETS = (1, 2, 5, 10, 20)
FINISH_REASONS = ("stop", "length", "abort", "error")
LABELS = ("model_name", "engine")
MAX_OPEN_PARENTS = 4096  # n > 1 requests with choices still running (refused ones never finish)


class PrometheusStatLogger:
    """One app's registry. `record` is the engine's stat-logger hook (on the event loop)."""

    def __init__(self, model_name: str, max_model_len: int, cache_config: dict[str, str],
                 engine_index: int = 0, num_speculative_tokens: int = 0):
        self.registry = CollectorRegistry()
        self.labels = (model_name, str(engine_index))
        registry = self.registry
        ProcessCollector(registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=registry).labels(*self.labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=registry).labels(*self.labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=registry).labels(*self.labels)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.prompt_tokens_cached = counter("vllm:prompt_tokens_cached",
                                            "Number of cached prompt tokens (prefix cache hits).")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.cache_queries = counter("vllm:prefix_cache_queries",
                                     "Prefix cache queries, in terms of number of queried tokens.")
        self.cache_hits = counter("vllm:prefix_cache_hits",
                                  "Prefix cache hits, in terms of number of cached tokens.")
        # Hybrid (recurrent) models: prefix hits need a state snapshot where the hit ends.
        self.snapshot_hits = counter("shoal:state_snapshot_hits",
                                     "Admissions of a recurrent model restored from a state snapshot.")
        self.snapshot_misses = counter("shoal:state_snapshot_misses",
                                       "Admissions of a recurrent model that found no state snapshot.")
        self.snapshot_evictions = counter("shoal:state_snapshot_evictions",
                                          "State snapshots dropped for room or with their KV block.")
        self.snapshot_usage = gauge("shoal:state_snapshot_usage_perc",
                                    "State snapshot pool usage. 1 means 100 percent usage.")
        self.spec_drafts = counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.")
        self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.spec_accepted = counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.")
        self.spec_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                    "Accepted tokens per draft position.", [*LABELS, "position"], registry=registry)
        for position in range(num_speculative_tokens):  # every series from startup, as vLLM
            self.spec_per_pos.labels(*self.labels, str(position))
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*LABELS, "finished_reason"], registry=registry)
        self.success = {reason: success.labels(*self.labels, reason) for reason in FINISH_REASONS}
        token_buckets = buckets_1_2_5(max_model_len)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", REQUEST_TIME_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_TIME_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.", REQUEST_TIME_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.", REQUEST_TIME_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.", REQUEST_TIME_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", TPOT_BUCKETS)
        self.request_prompt = histogram("vllm:request_prompt_tokens",
                                        "Number of prefill tokens processed.", token_buckets)
        self.request_generation = histogram("vllm:request_generation_tokens",
                                            "Number of generation tokens processed.", token_buckets)
        self.max_generation = histogram("vllm:request_max_num_generation_tokens",
                                        "Histogram of maximum number of requested generation tokens.",
                                        token_buckets)
        self.params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.", token_buckets)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.",
                                          ITERATION_TOKEN_BUCKETS)
        info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                     [*sorted(cache_config), "engine"], registry=registry)
        info.labels(**cache_config, engine=self.labels[1]).set(1)
        sleep = Gauge("vllm:engine_sleep_state", "Engine sleep state; awake = 0 means engine is sleeping; "
                      "awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; "
                      "discard_all = 1 means sleep level 2.", [*LABELS, "sleep_state"], registry=registry)
        for state, value in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
            sleep.labels(*self.labels, state).set(value)  # Shoal never sleeps
        self._children: dict[str, tuple[int, int]] = {}  # parent id -> (finished, max tokens)
        self.http_requests = Counter("http_requests_total", "Total number of requests by method, status and handler.",
                                     ["method", "status", "handler"], registry=registry)

    def record(self, scheduler: SchedulerStats, iteration: IterationStats) -> None:
        self.running.set(scheduler.num_running)
        self.waiting.set(scheduler.num_waiting)
        self.kv_usage.set(scheduler.kv_cache_usage)
        self.prompt_tokens.inc(iteration.num_prompt_tokens)
        self.prompt_tokens_cached.inc(iteration.num_cached_prompt_tokens)
        self.generation_tokens.inc(iteration.num_generation_tokens)
        self.preemptions.inc(iteration.num_preemptions)
        self.cache_queries.inc(iteration.prefix_cache_queries)
        self.cache_hits.inc(iteration.prefix_cache_hits)
        self.snapshot_hits.inc(iteration.snapshot_hits)
        self.snapshot_misses.inc(iteration.snapshot_misses)
        self.snapshot_evictions.inc(iteration.snapshot_evictions)
        self.snapshot_usage.set(scheduler.snapshot_usage)
        self.spec_drafts.inc(iteration.spec_num_drafts)
        self.spec_draft_tokens.inc(iteration.spec_num_draft_tokens)
        self.spec_accepted.inc(iteration.spec_num_accepted_tokens)
        for position, accepted in enumerate(iteration.spec_accepted_per_pos):
            if accepted:
                self.spec_per_pos.labels(*self.labels, str(position)).inc(accepted)
        if iteration.num_batched_tokens:
            self.iteration_tokens.observe(iteration.num_batched_tokens)
        for seconds in iteration.time_to_first_tokens:
            self.ttft.observe(seconds)
        for seconds in iteration.inter_token_latencies:
            self.itl.observe(seconds)
        for finished in iteration.finished:
            self._finished(finished)

    def _finished(self, r: FinishedRequestStats) -> None:
        self.success[r.finish_reason if r.finish_reason in self.success else "error"].inc()
        self.e2e.observe(r.e2e_latency)
        self.request_prompt.observe(r.num_prompt_tokens)
        self.request_generation.observe(r.num_generation_tokens)
        self.params_max_tokens.observe(r.max_tokens_param)
        for histogram, value in ((self.queue, r.queued_time), (self.prefill, r.prefill_time),
                                 (self.decode, r.decode_time), (self.inference, r.inference_time),
                                 (self.tpot, r.mean_time_per_output_token)):
            if value is not None:
                histogram.observe(value)
        # Once per API request: n, and the most tokens any of its n choices generated.
        if r.parent_id is None:
            self.params_n.observe(r.n_param)
            self.max_generation.observe(r.num_generation_tokens)
            return
        done, most = self._children.pop(r.parent_id, (0, 0))
        done, most = done + 1, max(most, r.num_generation_tokens)
        if done < r.n_param:
            self._children[r.parent_id] = (done, most)
            while len(self._children) > MAX_OPEN_PARENTS:  # parents whose choices never all came
                del self._children[next(iter(self._children))]
            return
        self.params_n.observe(r.n_param)
        self.max_generation.observe(most)

    def render(self) -> bytes:
        """The exposition text for GET /metrics."""
        return generate_latest(self.registry)


class HttpMetricsMiddleware:
    """`http_requests_total{method, status, handler}` as prometheus-fastapi-instrumentator
    (vLLM's) counts it: status grouped as 2xx..5xx, handler the route template."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            server = getattr(scope["app"].state, "server", None) if "app" in scope else None
            if server is not None:
                route = scope.get("route")
                handler = getattr(route, "path", None) or "none"
                server.metrics.http_requests.labels(scope["method"], f"{status[0] // 100}xx", handler).inc()
