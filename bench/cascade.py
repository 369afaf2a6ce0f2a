"""Swarm decode with and without cascade attention, and against mlx-lm's dense batch decode.

    python -m shoal.bench.cascade attention            # attention only, the cost-rule sweep
    python -m shoal.bench.cascade decode --agents 64 32 8 --prefix-lens 2048 8192

`attention`: one decode step's attention over the paged pool (write, gather or prefix pass,
attend) for 30 layers of SmolLM2's KV shape, rows sharing a prefix of P tokens and owning 64
tokens each: the gather path (the reference) vs cascade, per (rows, P).

`decode`: the whole engine on SmolLM2-135M's shape (random float32 weights). Per prefix length,
the largest swarm arrives at once (shared system prompt + a distinct 64-token turn each) and
is prefilled once; then decode steps are timed with the cascade and the gather backend in
turn on the same live requests (interleaved rounds, the median step), and the swarm is cut to
the next size by aborting requests. The peer is mlx-lm's own batched decode (what
`mlx_lm.server`'s BatchGenerator runs per step): the model over a dense `KVCache` of the same
batch and context, each row holding its own copy of the prefix. Reported: decode step time,
aggregate output tok/s (rows / step time), KV blocks in use and their bytes, process RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from shoal.engine.platform import preload_blas

OWN_TOKENS = 64
LAYERS, KV_HEADS, HEADS, HEAD_DIM = 30, 3, 9, 64  # SmolLM2-135M


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def time_attention(rows: int, prefix: int, backend: str, repeats: int) -> float:
    """Median seconds of one decode step's attention, all layers."""
    import mlx.core as mx

    from shoal.engine.attention import AttentionSelector
    from shoal.engine.paged_cache import PagedKVCache
    from shoal.kernels.paged_attention import gather_kv

    bs = 16
    prefix_blocks = prefix // bs
    own_blocks = -(-(prefix % bs + OWN_TOKENS + 1) // bs)
    num_blocks = 1 + prefix_blocks + rows * own_blocks
    num_slots = num_blocks * bs
    caches = [PagedKVCache(mx.random.normal((KV_HEADS * num_slots, HEAD_DIM)),
                           mx.random.normal((KV_HEADS * num_slots, HEAD_DIM)), KV_HEADS) for _ in range(LAYERS)]
    mx.eval([c.state for c in caches])
    shared = tuple(range(1, 1 + prefix_blocks))
    tables = [shared + tuple(1 + prefix_blocks + r * own_blocks + i for i in range(own_blocks)) for r in range(rows)]
    starts = [prefix + OWN_TOKENS] * rows
    selector = AttentionSelector("cascade" if backend == "cascade" else "gather", bs, num_slots, KV_HEADS)
    queries = [mx.random.normal((rows, HEADS, 1, HEAD_DIM)) for _ in caches]
    new_kv = [mx.random.normal((rows, KV_HEADS, 1, HEAD_DIM)) for _ in caches]
    mx.eval(queries, new_kv)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        ctx = selector.step_context(tables, starts, [1] * rows)
        outs = []
        for layer, cache in enumerate(caches):
            cache.ctx = ctx
            keys, values = cache.update_and_fetch(new_kv[layer], new_kv[layer])
            outs.append(ctx.backend.attend(ctx, cache, queries[layer], keys, values, HEAD_DIM**-0.5,
                                           ctx.mask, None))
            mx.eval(outs[-1], cache.state)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def time_attention_fresh(rows: int, prefix: int, backend: str, repeats: int, blas: str) -> float:
    """`time_attention` in a new process. In one long-lived process the gather path's timing
    depends on what ran before (measured: 8 rows x 512 tokens took 62 ms a step fresh, 197 ms
    after one run at 256 tokens), which would skew the comparison."""
    import subprocess

    code = (f"from shoal.engine.platform import preload_blas; preload_blas({blas!r}); "
            f"from shoal.bench.cascade import time_attention; "
            f"print(time_attention({rows}, {prefix}, {backend!r}, {repeats}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_attention(args) -> dict[str, Any]:
    rows_out = []
    for rows in args.rows:
        for prefix in args.prefix_lens:
            gather = time_attention_fresh(rows, prefix, "gather", args.repeats, args.blas)
            cascade = time_attention_fresh(rows, prefix, "cascade", args.repeats, args.blas)
            rows_out.append({"rows": rows, "prefix": prefix, "gather_ms": round(gather * 1e3, 2),
                             "cascade_ms": round(cascade * 1e3, 2), "speedup": round(gather / cascade, 2)})
            print(f"rows {rows:3d} prefix {prefix:6d}: gather {gather * 1e3:9.2f} ms  cascade "
                  f"{cascade * 1e3:9.2f} ms  x{gather / cascade:.2f}", flush=True)
    print("\n| rows | shared prefix | gather ms/step | cascade ms/step | speedup |\n|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['rows']} | {r['prefix']} | {r['gather_ms']} | {r['cascade_ms']} | {r['speedup']} |")
    return {"rows": rows_out}


def dense_decode_step(model, batch: int, context: int, steps: int) -> float | None:
    """mlx-lm's batched decode over a dense cache of `batch` rows x `context` tokens: median
    seconds per step (None when the cache would not fit in memory)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    nbytes = 2 * LAYERS * batch * KV_HEADS * context * HEAD_DIM * 4
    if nbytes > 14 * 2**30:
        return None
    caches = []
    for _ in model.layers:
        cache = KVCache()
        cache.update_and_fetch(mx.zeros((batch, KV_HEADS, context, HEAD_DIM)),
                               mx.zeros((batch, KV_HEADS, context, HEAD_DIM)))
        caches.append(cache)
    mx.eval([c.state for c in caches])
    tokens = mx.zeros((batch, 1), dtype=mx.int32)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits = model(tokens, cache=caches)
        tokens = mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32)
        mx.eval(tokens)
        times.append(time.perf_counter() - start)
    del caches
    return statistics.median(times[1:])


def run_decode(args) -> dict[str, Any]:
    import mlx.core as mx
    import numpy as np

    from shoal.bench.offline import load_bench_model
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm import LLM
    from shoal.engine.model_runner import ModelRunner
    from shoal.engine.request import RequestStatus
    from shoal.engine.sampling_params import SamplingParams

    model, tokenizer, path = load_bench_model(args.model)
    agents = sorted(args.agents, reverse=True)
    results = []
    for prefix in args.prefix_lens:
        rng = np.random.default_rng(prefix)
        system = rng.integers(100, 49000, prefix).tolist()
        prompts = [system + rng.integers(100, 49000, OWN_TOKENS).tolist() for _ in range(agents[0])]
        budget = len(agents) * args.rounds * 2 * (args.steps + 1) + 4  # every timed and warm step
        max_len = prefix + OWN_TOKENS + budget + 16
        blocks = prefix // 16 + agents[0] * (-(-(OWN_TOKENS + budget + 16) // 16)) + 2
        config = EngineConfig(max_num_seqs=agents[0], num_blocks=blocks, max_model_len=max_len,
                              max_num_batched_tokens=args.max_num_batched_tokens, attention_backend="cascade")
        llm = LLM(config, ModelRunner.from_model(model, tokenizer, config))
        params = SamplingParams(temperature=0, max_tokens=budget, ignore_eos=True)
        requests = [llm.add(p, params) for p in prompts]
        start = time.perf_counter()
        while any(r.num_output_tokens == 0 for r in requests):
            llm.step()
        prefill_s = time.perf_counter() - start
        computed = llm.scheduler.stats.num_computed_tokens
        print(f"prefix {prefix}: {agents[0]} agents prefilled in {prefill_s:.1f} s, {computed} tokens "
              f"computed of {sum(len(p) for p in prompts)}", flush=True)
        for n in agents:
            live = [r for r in requests if not r.status.finished]
            llm.scheduler.finish_requests([r.request_id for r in live[n:]], RequestStatus.FINISHED_ABORTED)
            llm.step()  # the aborts reach the runner
            pool = llm.scheduler.pool
            used = pool.num_blocks - 1 - pool.num_free_blocks
            times: dict[str, list[float]] = {"cascade": [], "gather": []}
            for round_ in range(args.rounds):
                for backend in (("cascade", "gather") if round_ % 2 == 0 else ("gather", "cascade")):
                    llm.runner.attention.set_mode(backend)
                    llm.step()  # warm the shapes
                    for _ in range(args.steps):
                        t = time.perf_counter()
                        llm.step()
                        times[backend].append(time.perf_counter() - t)
            dense = dense_decode_step(model, n, prefix + OWN_TOKENS + budget // 2, args.steps) if "mlx_lm" in args.peers else None
            row = {"agents": n, "prefix": prefix, "prefill_s": round(prefill_s, 1),
                   "cascade_step_ms": round(statistics.median(times["cascade"]) * 1e3, 1),
                   "gather_step_ms": round(statistics.median(times["gather"]) * 1e3, 1),
                   "mlx_lm_dense_step_ms": round(dense * 1e3, 1) if dense else None,
                   "kv_blocks_in_use": used, "kv_bytes_in_use": used * llm.runner.info.kv_cache_bytes // pool.num_blocks,
                   "dense_kv_bytes": 2 * LAYERS * n * KV_HEADS * (prefix + OWN_TOKENS) * HEAD_DIM * 4,
                   "rss_bytes": rss_bytes()}
            row["cascade_tok_s"] = round(n / row["cascade_step_ms"] * 1e3, 2)
            row["gather_tok_s"] = round(n / row["gather_step_ms"] * 1e3, 2)
            row["cascade_vs_gather"] = round(row["gather_step_ms"] / row["cascade_step_ms"], 2)
            if dense:
                row["mlx_lm_tok_s"] = round(n / dense, 2)
                row["cascade_vs_mlx_lm"] = round(dense * 1e3 / row["cascade_step_ms"], 2)
            results.append(row)
            print(json.dumps(row), flush=True)
        del llm
        mx.clear_cache()
    print_decode_table(results)
    return {"model": path, "rows": results}


def print_decode_table(rows: list[dict[str, Any]]) -> None:
    gib = 2**30
    print("\n| agents | shared prefix | step ms: cascade / gather / mlx-lm dense | out tok/s: cascade "
          "/ gather / mlx-lm | cascade vs gather | cascade vs mlx-lm | KV in use (dense) | RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dense = r["mlx_lm_dense_step_ms"] or "-"
        print(f"| {r['agents']} | {r['prefix']} | {r['cascade_step_ms']} / {r['gather_step_ms']} / {dense} | "
              f"{r['cascade_tok_s']} / {r['gather_tok_s']} / {r.get('mlx_lm_tok_s', '-')} | "
              f"{r['cascade_vs_gather']}x | {r.get('cascade_vs_mlx_lm', '-')}{'x' if 'cascade_vs_mlx_lm' in r else ''} | "
              f"{r['kv_bytes_in_use'] / gib:.2f} GiB ({r['dense_kv_bytes'] / gib:.2f} GiB) | {r['rss_bytes'] / gib:.2f} GiB |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    att = sub.add_parser("attention")
    att.add_argument("--rows", type=int, nargs="+", default=[2, 8, 32])
    att.add_argument("--prefix-lens", type=int, nargs="+", default=[64, 128, 256, 512, 2048, 8192])
    att.add_argument("--repeats", type=int, default=3)
    dec = sub.add_parser("decode")
    dec.add_argument("--model", default="smollm2-shape")
    dec.add_argument("--agents", type=int, nargs="+", default=[64, 32, 8])
    dec.add_argument("--prefix-lens", type=int, nargs="+", default=[2048, 8192])
    dec.add_argument("--steps", type=int, default=3, help="timed decode steps per backend per round")
    dec.add_argument("--rounds", type=int, default=2)
    dec.add_argument("--max-num-batched-tokens", type=int, default=2048)
    dec.add_argument("--peers", nargs="*", default=["mlx_lm"])
    for p in (att, dec):
        p.add_argument("--blas", default="auto")
        p.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    blas = preload_blas(args.blas)
    print(f"# {blas}", flush=True)
    result = run_attention(args) if args.mode == "attention" else run_decode(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"blas": blas, "args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
