"""`shoal bench serve` and `shoal bench compare` against real servers on a tiny random model:
the load generator's counts must agree with what the server itself counted in /metrics."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

pytest.register_assert_rewrite("server_util")
from server_util import Server, metric  # noqa: E402

from shoal.bench.report import Summary, summarize, tpot  # noqa: E402
from shoal.bench.serve import RequestResult, RunResult, ServeConfig, StreamRecorder, run_benchmark  # noqa: E402
from shoal.bench.workloads import TextSource, WorkloadConfig, build_sessions, load_tokenizer  # noqa: E402

pytest_plugins = ["server_util"]
COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_hits_total",
            "vllm:num_preemptions_total")


@pytest.fixture(scope="module")
def source(tiny_model_dir: Path) -> TextSource:
    return TextSource(load_tokenizer(tiny_model_dir))


def counters(server: Server) -> dict[str, float]:
    samples = server.metrics()
    return {name: metric(samples, name) for name in COUNTERS}


def run_and_count(server: Server, config: ServeConfig, workload: WorkloadConfig,
                  source: TextSource) -> tuple[RunResult, Summary, dict[str, float]]:
    """Run the workload; return the run, its summary and the server's counter increases."""
    before = counters(server)
    run = run_benchmark(config, build_sessions(workload, source))
    after = counters(server)
    return run, summarize(run), {k: after[k] - before[k] for k in COUNTERS}


def assert_counts_match_server(run: RunResult, summary: Summary, delta: dict[str, float],
                               num_requests: int) -> None:
    assert summary.num_completed == num_requests and len(run.results) == num_requests
    assert summary.num_failed == 0 and summary.num_unsent == 0, summary.errors
    assert all(r.usage_reported and r.ttft is not None and r.ttft <= r.latency for r in run.results)
    assert summary.output_tokens == sum(r.output_tokens for r in run.results)
    assert summary.output_tokens == delta["vllm:generation_tokens_total"]
    assert summary.prompt_tokens == delta["vllm:prompt_tokens_total"]


def base_config(server: Server, **overrides: object) -> ServeConfig:
    return replace(ServeConfig(server.base_url, "tiny", timeout=60.0, progress=False), **overrides)


def test_random_token_ids_all_at_once(tiny_server: Server, source: TextSource) -> None:
    workload = WorkloadConfig("random", num_prompts=8, input_len=40, output_len=12, prompt_ids=True, seed=1)
    run, summary, delta = run_and_count(tiny_server, base_config(tiny_server), workload, source)
    assert_counts_match_server(run, summary, delta, 8)
    assert summary.prompt_tokens == 8 * 40 and summary.output_tokens == 8 * 12  # ignore_eos honoured
    assert summary.ttft.count == 8 and summary.tpot.count == 8 and summary.itl.count > 0
    assert summary.output_throughput == pytest.approx(summary.output_tokens / summary.duration_s)


def test_random_text_fixed_concurrency(tiny_server: Server, source: TextSource) -> None:
    workload = WorkloadConfig("random", num_prompts=6, input_len=50, output_len=10, seed=2)
    config = base_config(tiny_server, max_concurrency=2)
    run, summary, delta = run_and_count(tiny_server, config, workload, source)
    assert_counts_match_server(run, summary, delta, 6)
    assert [r.prompt_tokens for r in run.results] == [50] * 6  # text built to the exact length
    # never more than two requests in flight
    events = sorted([(r.start, 1) for r in run.results] + [(r.start + r.latency, -1) for r in run.results])
    in_flight = [sum(e for _, e in events[: i + 1]) for i in range(len(events))]
    assert max(in_flight) == 2


def test_swarm_shares_the_system_prompt(tiny_server: Server, source: TextSource) -> None:
    workload = WorkloadConfig("swarm", num_prompts=8, input_len=20, output_len=8, system_len=300, seed=3)
    config = base_config(tiny_server, endpoint="chat", request_rate=math.inf)
    run, summary, delta = run_and_count(tiny_server, config, workload, source)
    assert_counts_match_server(run, summary, delta, 8)
    assert summary.cached_tokens > 0
    if delta["vllm:num_preemptions_total"] == 0:  # a re-admitted request would query again
        assert summary.cached_tokens == delta["vllm:prefix_cache_hits_total"]


def test_multiturn_resends_the_conversation(tiny_server: Server, source: TextSource) -> None:
    workload = WorkloadConfig("multiturn", num_prompts=6, num_turns=3, input_len=15, output_len=6,
                              system_len=40, seed=4)
    run, summary, delta = run_and_count(tiny_server, base_config(tiny_server, endpoint="chat",
                                                                 request_rate=50.0), workload, source)
    assert_counts_match_server(run, summary, delta, 6)
    by_start = sorted(run.results, key=lambda r: r.start)
    assert len({r.prompt_tokens for r in by_start}) > 2  # the prompts grow turn by turn
    assert summary.cached_tokens > 0  # later turns hit the earlier turns' blocks


def test_timeout_bounds_the_run(tiny_server: Server, source: TextSource) -> None:
    workload = WorkloadConfig("random", num_prompts=4, input_len=16, output_len=900, seed=5)
    config = base_config(tiny_server, timeout=0.5, max_concurrency=1)
    run = run_benchmark(config, build_sessions(workload, source))
    assert run.duration < 5.0
    summary = summarize(run)
    assert summary.num_failed >= 1 and summary.num_unsent >= 1
    assert summary.num_completed + summary.num_failed + summary.num_unsent == 4
    assert "timeout" in summary.errors[0]


def test_stream_recorder_skips_non_token_chunks() -> None:
    """mlx_lm.server keep-alive comments and Shoal's role opening are not tokens."""
    recorder = StreamRecorder("k", run_start=0.0, start=1.0)
    lines = [": keepalive 8/16", "", 'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}',
             'data: {"choices": [{"delta": {"content": "a"}}]}', 'data: {"choices": [{"delta": {"content": "b"}}]}',
             'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}',
             'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, '
             '"prompt_tokens_details": {"cached_tokens": 4}}}']
    times = [1.1, 1.2, 1.3, 1.5, 1.8, 1.9, 2.0]
    assert not any(recorder.feed(line, t) for line, t in zip(lines, times))
    assert recorder.feed("data: [DONE]", 2.1)
    result = recorder.result(2.1)
    assert result.ttft == pytest.approx(0.5) and result.itl == pytest.approx((0.3,))
    assert (result.prompt_tokens, result.output_tokens, result.cached_tokens) == (9, 3, 4)
    assert tpot(result) == pytest.approx((1.1 - 0.5) / 2)


def test_stream_recorder_counts_chunks_without_usage() -> None:
    recorder = StreamRecorder("k", run_start=0.0, start=0.0)
    for i, line in enumerate(['data: {"choices": [{"text": "x"}]}'] * 3):
        recorder.feed(line, 0.1 * (i + 1))
    result = recorder.result(0.5)
    assert result.success and result.output_tokens == 3 and not result.usage_reported
    error = StreamRecorder("k", 0.0, 0.0)
    error.feed('data: {"error": {"message": "boom"}}', 0.1)
    assert not error.result(0.2).success


def test_tpot_needs_two_tokens() -> None:
    one = RequestResult("k", True, start=0.0, latency=1.0, ttft=0.5, output_tokens=1)
    assert tpot(one) is None
