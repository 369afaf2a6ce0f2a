"""An agent swarm through the smg gateway (`shoal serve -dp N`) against one replica alone.

    python -m shoal.bench.gateway [--model DIR] [--replicas 2] [--teams 4] [--agents 8]

Each team's agents share a long system prompt and send one request each, every agent at
once. Configurations: one `shoal serve`, then N replicas behind smg with cache_aware and with
round_robin, each a fresh process set (cold caches). Reported per configuration: prefix-cache
hit rate (cached / prompt tokens, from the replies' usage), TTFT p50/p99, throughput. Without
--model, a tiny random llama is built (bench/random_model.py), so the run measures the serving
path rather than a model.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from shoal.bench.report import summarize
from shoal.bench.serve import ServeConfig, run_benchmark
from shoal.bench.workloads import Session, TextSource, Turn

POLICIES = ("cache_aware", "round_robin")


def swarm(teams: int, agents: int, system_len: int, user_len: int, output_len: int) -> list[Session]:
    """Agents in arrival order: every team's first agent, then every team's second, ..."""
    rng, source = np.random.default_rng(0), TextSource()
    systems = [f"Team {t}: " + source.text(system_len, rng) for t in range(teams)]
    users = {(t, a): source.text(user_len, rng) for a in range(agents) for t in range(teams)}
    return [Session(f"team{t}", (Turn(users[t, a], output_len),), systems[t])
            for a in range(agents) for t in range(teams)]


def start(model: Path, port: int, replicas: int, policy: str | None, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "shoal", "serve", str(model), "--port", str(port),
            "--served-model-name", "bench", "--max-model-len", "2048", "--kv-cache-memory", "256MiB",
            "--disable-log-stats"]
    if policy:
        argv += ["--data-parallel-size", str(replicas), "--gateway-policy", policy,
                 "--gateway-metrics-port", str(port + replicas + 1)]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, process: subprocess.Popen, workers: int | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if workers is None and httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
            if workers is not None and httpx.get(f"{url}/readiness", timeout=2).json().get(
                    "healthy_workers") == workers:
                return
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def measure(model: Path, args: argparse.Namespace, policy: str | None, logs: Path) -> dict:
    process = start(model, args.port, args.replicas, policy, logs / f"{policy or 'single'}.log")
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, process, args.replicas if policy else None)
        sessions = swarm(args.teams, args.agents, args.system_len, args.user_len, args.output_len)
        summary = summarize(run_benchmark(ServeConfig(url, "bench", endpoint="chat", progress=False), sessions))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    return {"setup": f"{args.replicas} replicas, smg {policy}" if policy else "1 replica",
            "ok": f"{summary.num_completed}/{len(sessions)}",
            "hit": summary.cached_tokens / max(summary.prompt_tokens, 1),
            "ttft_p50": summary.ttft.p50_ms, "ttft_p99": summary.ttft.p99_ms,
            "req_s": summary.request_throughput, "tok_s": summary.output_throughput}


def table(rows: list[dict]) -> str:
    lines = ["| setup | completed | prefix hit rate | TTFT p50 (ms) | TTFT p99 (ms) | req/s | output tok/s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setup']} | {r['ok']} | {r['hit']:.1%} | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} "
              f"| {r['req_s']:.2f} | {r['tok_s']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="mlx-lm model directory (default: a tiny random llama)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--teams", type=int, default=4, help="distinct system prompts")
    p.add_argument("--agents", type=int, default=8, help="agents (requests) per system prompt")
    p.add_argument("--system-len", type=int, default=150, help="words in each system prompt")
    p.add_argument("--user-len", type=int, default=16, help="words in each agent's message")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--port", type=int, default=18800, help="the server's port (replicas take the next ones)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from shoal.bench.random_model import make_random_model

            model = make_random_model(Path(tmp) / "tiny-llama", "llama", hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
        rows = [measure(model, args, policy, Path(tmp)) for policy in (None, *POLICIES)]
    print(table(rows))
    print(f"({os.cpu_count()} CPUs; {args.teams} system prompts x {args.agents} agents, all at once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
