"""Agent workloads against servers started here, one server at a time on the same model:

    conversation  one agent: a long system prompt, then turns that each resend the whole
                  conversation (the previous prompt + the answer + a short user message), as
                  Claude Code, Codex and OpenCode do. Per turn: TTFT, prompt tokens, tokens
                  served from the server's cache and tokens computed.
    swarm         N agents with one shared system prompt and a short turn each, all at once:
                  prompt tokens computed in all (from /metrics), TTFT.

    python -m shoal.bench.agent_turns conversation --model qwen3.5-shape --servers shoal mlx_lm
    python -m shoal.bench.agent_turns swarm --model qwen3.5-shape --agents 16 --servers shoal
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from shoal.bench.compare import ServerProcess, counter_deltas, scrape_counters, server_spec
from shoal.bench.serve import RequestResult, ServeConfig, run_benchmark
from shoal.bench.workloads import Session, TextSource, Turn, load_tokenizer
from shoal.cli import positive_int


def start(name: str, model_dir: str, args: argparse.Namespace, logs: Path) -> ServerProcess:
    shoal_args = tuple(args.shoal_arg) if name.startswith("shoal") else ()
    return ServerProcess(server_spec(name, model_dir, args.blas, shoal_args), logs / f"{name}.log", 600.0)


def chat(server: ServerProcess, sessions: list[Session], timeout: float) -> list[RequestResult]:
    config = ServeConfig(server.base_url, server.spec.model_name, "chat", timeout=timeout, progress=False)
    results = run_benchmark(config, sessions).results
    failed = [r.error for r in results if not r.success]
    if failed:
        raise RuntimeError(f"{server.spec.name}: {failed}\n{server.log_tail()}")
    return list(results)


def warm_up(server: ServerProcess, source: TextSource, rng) -> None:
    """One short unrelated request, so the first measured turn pays no start-up costs."""
    chat(server, [Session("warm-up", (Turn(source.text(16, rng), 4),))], 300.0)


def conversation(args: argparse.Namespace, model_dir: str, source: TextSource) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    system = source.text(args.system_len, rng)
    turns = tuple(Turn(source.text(args.user_len, rng), args.output_len) for _ in range(args.turns))
    out: dict[str, Any] = {}
    for name in args.servers:
        with start(name, model_dir, args, Path(args.logs)) as server:
            warm_up(server, source, np.random.default_rng(args.seed + 1))
            results = chat(server, [Session("agent", turns, system)], args.timeout)
        out[name] = [{"turn": i + 1, "ttft": r.ttft, "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
                      "computed_tokens": r.prompt_tokens - r.cached_tokens, "output_tokens": r.output_tokens,
                      "latency": r.latency} for i, r in enumerate(results)]
        print_conversation(name, out[name])
    return out


def print_conversation(name: str, turns: list[dict[str, Any]]) -> None:
    cold = turns[0]["ttft"]
    print(f"\n{name}: turn | prompt | cached | computed | TTFT s | TTFT / turn 1")
    for t in turns:
        print(f"  {t['turn']} | {t['prompt_tokens']:,} | {t['cached_tokens']:,} | {t['computed_tokens']:,} | "
              f"{t['ttft']:.2f} | {t['ttft'] / cold:.1%}")
    sys.stdout.flush()


def swarm(args: argparse.Namespace, model_dir: str, source: TextSource) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    system = source.text(args.system_len, rng)
    sessions = [Session("swarm", (Turn(source.text(args.user_len, rng), args.output_len),), system)
                for _ in range(args.agents)]
    out: dict[str, Any] = {}
    for name in args.servers:
        with start(name, model_dir, args, Path(args.logs)) as server:
            warm_up(server, source, np.random.default_rng(args.seed + 1))
            before = scrape_counters(server.base_url)
            results = chat(server, sessions, args.timeout)
            deltas = counter_deltas(before, scrape_counters(server.base_url), len(results))
        ttfts = sorted(r.ttft for r in results)
        out[name] = {"agents": args.agents, "prompt_tokens": sum(r.prompt_tokens for r in results),
                     "cached_tokens": sum(r.cached_tokens for r in results),
                     "ttft_p50": statistics.median(ttfts), "ttft_max": ttfts[-1],
                     "duration": max(r.start + r.latency for r in results), "server_metrics": deltas}
        row = out[name]
        print(f"\n{name}: {args.agents} agents, prompt tokens {row['prompt_tokens']:,}, cached {row['cached_tokens']:,}, "
              f"computed {row['prompt_tokens'] - row['cached_tokens']:,}"
              + (f" (metrics: {deltas['prefill_computed']:,.0f})" if deltas else "")
              + f", TTFT p50 {row['ttft_p50']:.1f} s, max {row['ttft_max']:.1f} s, all done in {row['duration']:.1f} s")
        sys.stdout.flush()
    return out


def main(argv: list[str] | None = None) -> int:
    from shoal.bench.commands import resolve_model

    p = argparse.ArgumentParser(prog="python -m shoal.bench.agent_turns", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=["conversation", "swarm"])
    p.add_argument("--model", default="qwen3.5-shape", help="a model directory or a bench shape")
    p.add_argument("--servers", nargs="+", default=["shoal", "mlx_lm"])
    p.add_argument("--system-len", type=positive_int, default=4096, help="system prompt tokens")
    p.add_argument("--user-len", type=positive_int, default=32, help="tokens of each user message")
    p.add_argument("--output-len", type=positive_int, default=32, help="tokens of each answer")
    p.add_argument("--turns", type=positive_int, default=5, help="conversation: turns")
    p.add_argument("--agents", type=positive_int, default=16, help="swarm: agents")
    p.add_argument("--shoal-arg", action="append", default=[], help="an extra `shoal serve` argument (repeatable)")
    p.add_argument("--blas", default="auto")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logs", default="/tmp/shoal-agent-turns", help="server logs")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    model_dir = resolve_model(args.model)
    source = TextSource(load_tokenizer(model_dir))
    run = conversation if args.workload == "conversation" else swarm
    results = {"workload": args.workload, "model": args.model, "args": vars(args), "servers": run(args, model_dir, source)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
