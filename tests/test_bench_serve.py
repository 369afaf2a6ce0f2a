"""`shoal bench serve` and `shoal bench compare` against real servers on a tiny random model:
the load generator's counts must agree with what the server itself counted in /metrics."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import Server, metric  # noqa: E402

from shoal.bench import commands  # noqa: E402
from shoal.bench.compare import CompareConfig, ServerProcess, run_comparison, server_spec  # noqa: E402
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


def live_cmdlines(needle: str) -> list[str]:
    """Command lines of running processes that mention `needle`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in text:
            found.append(text)
    return found


def test_compare_runs_both_servers_and_stops_them(tiny_model_dir: Path, source: TextSource,
                                                  tmp_path: Path) -> None:
    specs = tuple(server_spec(name, str(tiny_model_dir), "reference") for name in ("shoal", "mlx_lm"))
    config = CompareConfig(str(tiny_model_dir), specs, concurrencies=(1, 3), repeats=1,
                           workload=WorkloadConfig("random", input_len=24, output_len=6),
                           prompts_per_client=1, min_prompts=3, timeout=60.0, results_dir=tmp_path)
    markdown = run_comparison(config, source, "reference")
    assert "shoal / mlx_lm" in markdown
    records = json.loads((tmp_path / "compare.json").read_text())["records"]
    assert sorted((r["server"], r["concurrency"]) for r in records) == [
        ("mlx_lm", 1), ("mlx_lm", 3), ("shoal", 1), ("shoal", 3)]
    for r in records:
        summary, counted = r["summary"], r["server_metrics"]
        assert summary["num_completed"] == 3 and summary["num_failed"] == 0
        if r["server"] == "mlx_lm":
            assert counted is None  # no /metrics
            continue
        assert counted["prompt_tokens"] == summary["prompt_tokens"] == 3 * 24
        assert counted["generation_tokens"] == summary["output_tokens"] == 3 * 6
        assert counted["prefill_computed_steps"] == counted["prefill_computed"]
    assert (tmp_path / "compare.md").read_text() == markdown
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "compare.png").stat().st_size > 0
    assert not [c for c in live_cmdlines(str(tiny_model_dir)) if "mlx_lm.server" in c or " bench " in c]


def test_server_process_is_stopped_on_interrupt(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = server_spec("mlx_lm", str(tiny_model_dir), "reference")
    server = ServerProcess(spec, tmp_path / "mlx_lm.log", startup_timeout=120.0)
    with pytest.raises(KeyboardInterrupt), server:
        assert httpx.get(f"{server.base_url}/health", trust_env=False).status_code == 200
        raise KeyboardInterrupt
    assert server.process is not None and server.process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/health", trust_env=False)


def test_bench_serve_command_writes_json(tiny_server: Server, tiny_model_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "serve.json"
    code = commands.main(["serve", "--base-url", tiny_server.base_url + "/v1", "--tokenizer", str(tiny_model_dir),
                          "--num-prompts", "3", "--input-len", "20", "--output-len", "4", "--no-progress",
                          "--json", str(out)])
    assert code == 0 and "Successful requests:" in capsys.readouterr().out
    body = json.loads(out.read_text())
    assert body["config"]["model"] == "tiny"  # the first id of /v1/models
    assert body["summary"]["num_completed"] == 3 and body["summary"]["prompt_tokens"] == 60
    assert len(body["requests"]) == 3 and "text" not in body["requests"][0]


def test_bench_registers_on_the_shoal_cli_without_mlx() -> None:
    from shoal.cli import add_serve_command

    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_command(subparsers)
    commands.add_bench_command(subparsers)
    args = parser.parse_args(["bench", "serve", "--workload", "swarm", "--max-concurrency", "4"])
    assert args.handler is commands.run_serve_bench and args.blas == "reference" and args.log_level
    args = parser.parse_args(["bench", "compare", "--servers", "shoal", "mlx_lm", "--concurrency", "1", "2"])
    assert args.handler is commands.run_compare and args.blas == "auto" and args.concurrency == [1, 2]
    probe = "import sys, shoal.bench.commands; sys.exit('mlx.core' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0  # registering loads no MLX
