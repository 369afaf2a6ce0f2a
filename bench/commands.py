"""`shoal bench serve` and `shoal bench compare`: argument parsing and handlers.

MLX-free at import (the `shoal` CLI registers these before it preloads the BLAS); each
handler imports what it needs. Run directly as `python -m shoal.bench.commands serve ...`.

    shoal bench serve --base-url http://127.0.0.1:8000 --workload swarm --num-prompts 32
    shoal bench compare --model smollm2-shape --concurrency 1 4 8 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shoal.bench.workloads import WORKLOADS  # numpy only, no MLX
from shoal.cli import positive_int as positive

log = logging.getLogger("shoal")
SMOLLM2_SHAPE = "smollm2-shape"


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `bench` (with `serve` and `compare` under it) on the `shoal` CLI."""
    parser = subparsers.add_parser("bench", help="benchmark servers over HTTP",
                                   description="Load-test OpenAI-compatible servers.")
    add_bench_subcommands(parser)


def add_bench_subcommands(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    add_serve_parser(subparsers)
    add_compare_parser(subparsers)


def rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {text}")
    return value


def add_workload_options(p: argparse.ArgumentParser, num_prompts: int) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default="random")
    g.add_argument("--num-prompts", type=positive, default=num_prompts,
                   help="requests in all (multiturn: conversations x turns)")
    g.add_argument("--input-len", type=positive, default=256,
                   help="prompt tokens (random) or tokens per user turn (other workloads)")
    g.add_argument("--output-len", type=positive, default=64, help="max_tokens per request")
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in len * [1 - r, 1 + r]")
    g.add_argument("--prompt-ids", action="store_true",
                   help="random: send token-id lists (completions endpoint only)")
    g.add_argument("--system-len", type=int, default=1500,
                   help="swarm/multiturn: shared system prompt tokens (0: none)")
    g.add_argument("--num-turns", type=positive, default=4, help="multiturn: turns per conversation")
    g.add_argument("--long-input-len", type=positive, default=2048, help="mixed: long prompt tokens")
    g.add_argument("--long-output-len", type=positive, default=16, help="mixed: long prompt max_tokens")
    g.add_argument("--long-fraction", type=float, default=0.2, help="mixed: share of long prompts")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer for exact prompt lengths (default: the model, if it is a directory)")


def add_common(p: argparse.ArgumentParser, max_retries: int) -> None:
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--max-retries", type=int, default=max_retries,
                   help=f"resend a request that got no response at all, like the OpenAI SDK (default {max_retries})")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run; the rest is cancelled")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="load-test one OpenAI-compatible server",
                              description="Stream a workload to a running server and report "
                                          "TTFT, TPOT, ITL, E2E and throughput, like `vllm bench serve`.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--request-rate", type=rate, default=math.inf,
                   help="sessions per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=positive, default=None, help="sessions in flight at most")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", type=Path, default=None, help="write the summary and every request here")
    add_common(p, max_retries=0)
    add_workload_options(p, num_prompts=64)
    p.set_defaults(handler=run_serve_bench, blas="reference")  # the client loads no MLX


def add_compare_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="Shoal vs its peers, same model, same workload",
                              description="Start each server in turn on a loopback port and run the "
                                          "same workload at every concurrency level, repeatedly.")
    p.add_argument("--model", default=SMOLLM2_SHAPE,
                   help=f"model directory both servers load ({SMOLLM2_SHAPE}: random SmolLM2-shaped weights)")
    p.add_argument("--servers", nargs="+", default=None,
                   help="shoal, shoal-no-prefix-caching, shoal-no-cascade, shoal-full-prefill, mlx_lm, vllm_mlx (default: shoal mlx_lm "
                        "[vllm_mlx if installed])")
    p.add_argument("--concurrency", type=positive, nargs="+", default=[1, 4, 8, 16, 32])
    p.add_argument("--repeats", type=positive, default=3)
    p.add_argument("--prompts-per-client", type=positive, default=4,
                   help="each level sends concurrency x this many prompts ...")
    p.add_argument("--min-prompts", type=positive, default=8, help="... but at least this many")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="default: bench/results/compare-<workload>-<time>")
    p.add_argument("--blas", default="auto", metavar="auto|reference|PATH",
                   help="BLAS for both servers (Shoal: --blas; peers: LD_PRELOAD of the same library)")
    p.add_argument("--shoal-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `shoal serve` (repeatable, e.g. --shoal-arg=--max-num-seqs=64)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    add_common(p, max_retries=2)
    add_workload_options(p, num_prompts=64)
    p.set_defaults(handler=run_compare)


def workload_config(args: argparse.Namespace) -> Any:
    from shoal.bench.workloads import WorkloadConfig

    return WorkloadConfig(
        name=args.workload, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.range_ratio, prompt_ids=args.prompt_ids,
        system_len=args.system_len, num_turns=args.num_turns, long_input_len=args.long_input_len,
        long_output_len=args.long_output_len, long_fraction=args.long_fraction, seed=args.seed)


def text_source(tokenizer_path: str | None) -> Any:
    from shoal.bench.workloads import TextSource, load_tokenizer

    if tokenizer_path is None:
        log.warning("no tokenizer: prompt lengths are approximate (one word per token)")
        return TextSource()
    return TextSource(load_tokenizer(tokenizer_path))


def first_model(base_url: str) -> str:
    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    response = httpx.get(f"{root}/v1/models", timeout=30, trust_env=False)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def run_serve_bench(args: argparse.Namespace) -> int:
    import httpx

    from shoal.bench.report import format_summary, summarize
    from shoal.bench.serve import ServeConfig, result_dicts, run_benchmark
    from shoal.bench.workloads import build_sessions

    tokenizer = args.tokenizer or (args.model if args.model and Path(args.model).is_dir() else None)
    try:
        workload = workload_config(args)
        model = args.model or first_model(args.base_url)
        config = ServeConfig(args.base_url, model, args.endpoint, args.request_rate, args.max_concurrency,
                             args.timeout, args.temperature, not args.no_ignore_eos, args.api_key,
                             args.seed, not args.no_progress, args.max_retries)
        if workload.prompt_ids and args.endpoint == "chat":
            raise ValueError("--prompt-ids needs --endpoint completions")
        sessions = build_sessions(workload, text_source(tokenizer))
    except (ValueError, OSError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = run_benchmark(config, sessions)
    summary = summarize(run)
    print(format_summary(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        body = {"config": asdict(config), "workload": asdict(workload), "summary": asdict(summary),
                "requests": result_dicts(run)}
        args.json.write_text(json.dumps(body, indent=1, default=str))
    return 0 if summary.num_failed == 0 and summary.num_unsent == 0 else 1


def resolve_model(model: str) -> str:
    """A model directory; a bench shape (`smollm2-shape`, ...) is built once in Shoal's cache."""
    from shoal.bench.offline import BENCH_SHAPES, bench_model_path

    return bench_model_path(model) if model in BENCH_SHAPES else model


def run_compare(args: argparse.Namespace) -> int:
    from datetime import datetime

    from shoal.bench.compare import CompareConfig, default_servers, run_comparison, server_spec

    model_dir = resolve_model(args.model)
    names = tuple(args.servers or default_servers())
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        specs = tuple(server_spec(n, model_dir, args.blas, tuple(args.shoal_arg)) for n in names)
        config = CompareConfig(
            model_dir=model_dir, servers=specs, concurrencies=tuple(args.concurrency), repeats=args.repeats,
            workload=workload_config(args), prompts_per_client=args.prompts_per_client,
            min_prompts=args.min_prompts, endpoint=args.endpoint, timeout=args.timeout,
            max_retries=args.max_retries,
            startup_timeout=args.startup_timeout, progress=not args.no_progress,
            results_dir=args.results_dir or Path("bench/results") / f"compare-{args.workload}-{stamp}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(run_comparison(config, text_source(args.tokenizer or model_dir), args.blas))
    print(f"\nresults: {config.results_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.bench.commands",
                                     description="Load-test OpenAI-compatible servers.")
    add_bench_subcommands(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
