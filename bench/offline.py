"""Offline generation throughput: Shoal vs mlx-lm's BatchGenerator vs mlx-lm one request at
a time, same model, same prompts, same BLAS, one process.

    python -m shoal.bench.offline --batch-sizes 1 4 8 16 32

Every system generates exactly --max-tokens greedy tokens per prompt (EOS ignored). The
one-at-a-time peer runs min(batch, --single-cap) requests: its throughput does not depend on
the batch size, and running all of them would dominate the benchmark's time. On a shared,
noisy machine the systems are interleaved within each of --repeats rounds; the table reports
median throughput and the median ratio with its min-max over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import platform
import sys
import time
from pathlib import Path
from typing import Any

from shoal.engine.platform import preload_blas


def run_shoal(model, tokenizer, prompts: list[list[int]], max_tokens: int,
              prefix_caching: bool = False) -> dict[str, Any]:
    """Shoal's offline engine; `prefix_caching` as a server runs it (for hybrid models: the
    state snapshots' chunk cuts and copies, on prompts that share nothing)."""
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm import LLM
    from shoal.engine.model_runner import ModelRunner
    from shoal.engine.sampling_params import SamplingParams

    config = EngineConfig(max_num_seqs=max(len(prompts), 1), kv_cache_bytes=4 * 2**30,
                          max_model_len=2048, enable_prefix_caching=prefix_caching)
    runner = ModelRunner.from_model(model, tokenizer, config)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    LLM(config, runner).generate([p[:8] for p in prompts], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    llm = LLM(config, runner)
    start = time.perf_counter()
    tokens = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    total = sum(len(t) for t in tokens)
    return {"output_tokens": total, "seconds": seconds, "tok_per_s": total / seconds, "tokens": tokens,
            "steps": llm.scheduler.stats.num_steps}


# Random-weight models with a real model's layer shape: name -> (family, shape function).
BENCH_SHAPES = {"smollm2-shape": ("llama", "smollm2_shape"), "gemma3-shape": ("gemma3_text", "gemma3_shape"),
                "qwen3.5-shape": ("qwen3_5", "qwen3_5_shape"), "qwen3-shape": ("qwen3", "qwen3_shape")}


def bench_model_path(model_arg: str) -> str:
    """A model directory: a bench shape is built once (random weights) in Shoal's cache."""
    if model_arg in BENCH_SHAPES:
        from shoal.bench import random_model
        from shoal.engine.default_model import default_cache_dir

        family, shape = BENCH_SHAPES[model_arg]
        path = random_model.make_random_model(default_cache_dir() / "bench-models" / model_arg, family,
                                              **getattr(random_model, shape)())
    else:
        from shoal.engine.loader import resolve_model_path

        path = resolve_model_path(None if model_arg == "default" else model_arg)
    return str(path)


def load_bench_model(model_arg: str):
    from shoal.engine.loader import load_model

    path = bench_model_path(model_arg)
    model, tokenizer, _ = load_model(path)
    return model, tokenizer, path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-shape", help=f"{', '.join(BENCH_SHAPES)} (random weights), default, or a model path")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--systems", nargs="+", default=["shoal", "mlx_lm_batch", "mlx_lm_single"])
    parser.add_argument("--single-cap", type=int, default=2)
    parser.add_argument("--mlx-prefill-batch-size", type=int, default=None,
                        help="prompts mlx-lm's BatchGenerator prefills together (default: all; mlx-lm's own "
                             "default is 8, better for recurrent models on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blas", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    blas = preload_blas(args.blas)
    from shoal.bench.offline_peers import random_prompts, run_mlx_lm_batch, run_mlx_lm_single

    model, tokenizer, path = load_bench_model(args.model)
    runners = {"shoal": run_shoal, "shoal_cached": lambda m, t, p, n: run_shoal(m, t, p, n, prefix_caching=True),
               "mlx_lm_batch": lambda m, t, p, n: run_mlx_lm_batch(m, p, n, args.mlx_prefill_batch_size),
               "mlx_lm_single": lambda m, t, p, n: run_mlx_lm_single(m, p[:args.single_cap], n)}
    print(f"# {blas}; model {path}; {platform.machine()} {platform.processor() or ''}; "
          f"prompt {args.prompt_len}, new tokens {args.max_tokens}", flush=True)
    vocab = 49152 if args.model == "smollm2-shape" else 10000
    runs: dict[int, dict[str, list[float]]] = {b: {s: [] for s in args.systems} for b in args.batch_sizes}
    for round_ in range(args.repeats):
        for batch in args.batch_sizes:
            prompts = random_prompts(batch, args.prompt_len, vocab, seed=batch)
            for name in args.systems:
                result = runners[name](model, tokenizer, prompts, args.max_tokens)
                runs[batch][name].append(result["tok_per_s"])
                print(f"round {round_} batch {batch:3d} {name:14s} {result['tok_per_s']:8.2f} tok/s "
                      f"({result['seconds']:.1f} s)", flush=True)
    rows = [summarize(batch, runs[batch]) for batch in args.batch_sizes]
    print_table(rows, args.systems)
    if args.json:
        args.json.write_text(json.dumps({"blas": blas, "model": path, "args": vars(args) | {"json": str(args.json)},
                                         "rows": rows, "runs": runs}, indent=2))


def summarize(batch: int, runs: dict[str, list[float]]) -> dict[str, Any]:
    """Median tok/s per system, and Shoal's ratio to each peer per round: median, min, max."""
    row: dict[str, Any] = {"batch": batch}
    for name, values in runs.items():
        row[name] = round(statistics.median(values), 2)
    for peer in ("mlx_lm_batch", "mlx_lm_single"):
        if "shoal" in runs and peer in runs:
            ratios = [a / b for a, b in zip(runs["shoal"], runs[peer])]
            row[f"shoal/{peer}"] = [round(statistics.median(ratios), 2), round(min(ratios), 2), round(max(ratios), 2)]
    return row


def print_table(rows: list[dict[str, Any]], systems: list[str]) -> None:
    peers = [p for p in ("mlx_lm_batch", "mlx_lm_single") if f"shoal/{p}" in rows[0]]
    print("\n| batch | " + " | ".join(f"{s} tok/s" for s in systems)
          + "".join(f" | shoal / {p} (min-max)" for p in peers) + " |")
    print("|---" * (len(systems) + len(peers) + 1) + "|")
    for row in rows:
        cells = " | ".join(f"{row.get(s, '-')}" for s in systems)
        ratios = "".join(" | {} ({}-{})".format(*row[f"shoal/{p}"]) for p in peers)
        print(f"| {row['batch']} | {cells}{ratios} |")


if __name__ == "__main__":
    sys.exit(main())
