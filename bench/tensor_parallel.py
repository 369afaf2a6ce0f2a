"""Tensor parallel N vs 1 on this machine: step time (prefill and decode) and the bytes sent
between ranks per step, offline through the engine (no HTTP).

    python -m shoal.bench.tensor_parallel --model smollm2-shape --batch 8 --tp 2

Runs the workload once with one process, then with --tp ranks on a loopback ring (this
process is rank 0 and starts the others). Bytes per step: the step messages rank 0 sends
(measured) and the all-reduces of the sharded layers (two per layer, R x L x hidden float
values each; a ring all-reduce sends 2 (N-1) / N of that from every rank), computed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shoal.engine.platform import preload_blas


def run(llm, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    from shoal.engine.sampling_params import SamplingParams

    for p in prompts:
        llm.add(p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    prefill, decode, tokens = [], [], []
    while llm.scheduler.has_work():
        start = time.perf_counter()
        sched = llm.scheduler.schedule()
        outputs = llm.scheduler.update_from_output(sched, llm.runner.execute(sched))
        seconds = time.perf_counter() - start
        tokens += [(o.request.request_id, t) for o in outputs for t in o.new_token_ids]
        if sched.scheduled:
            (decode if sched.num_batched_tokens == len(sched.scheduled) else prefill).append((seconds, sched))
    return {"prefill_s": sum(s for s, _ in prefill), "decode_step_ms": 1000 * statistics.median(s for s, _ in decode),
            "num_decode_steps": len(decode), "tokens": tokens, "decode_tokens_per_step": len(prompts)}


def allreduce_bytes(model, rows: int, tokens_per_row: int, size: int) -> int:
    """What each rank sends for one step's all-reduces (attention out and MLP down, per layer)."""
    hidden, layers = model.args.hidden_size, len(model.layers)
    values = 2 * layers * rows * tokens_per_row * hidden
    return int(values * 4 * 2 * (size - 1) / size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-shape")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--blas", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    blas = preload_blas(args.blas)
    from shoal.bench.offline import bench_model_path
    from shoal.bench.offline_peers import random_prompts
    from shoal.engine import distributed
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm import LLM
    from shoal.engine.model_runner import ModelRunner

    config = EngineConfig(model=bench_model_path(args.model), max_num_seqs=args.batch, kv_cache_bytes=2**30, max_model_len=1024,
                          enable_prefix_caching=False, tensor_parallel_size=args.tp)
    if distributed.RANK_ENV in os.environ and os.environ[distributed.RANK_ENV] != "0":
        return distributed.run_worker(config)
    results = {}
    if distributed.RANK_ENV in os.environ:
        raise SystemExit("run it without a launcher: it starts its own ranks")
    single = LLM(config, ModelRunner.load(config))
    prompts = random_prompts(args.batch, args.prompt_len, min(10000, single.runner.info.vocab_size), seed=args.batch)
    results["tp1"] = run(single, prompts, args.max_tokens)
    model = single.runner.model
    del single
    workers = distributed.launch_local_workers(args.tp, ["-m", "shoal.bench.tensor_parallel", *sys.argv[1:]],
                                               Path(tempfile.mkdtemp(prefix="shoal-tp-bench-")))
    runner = distributed.rank0_runner(config)
    sharded = LLM(config, runner)
    results[f"tp{args.tp}"] = run(sharded, prompts, args.max_tokens)
    sent = runner.channel.bytes_sent
    steps = runner.channel.num_sent
    runner.close()
    for worker in workers:
        worker.wait()
    same = results["tp1"]["tokens"] == results[f"tp{args.tp}"]["tokens"]
    row = {"model": args.model, "blas": blas, "batch": args.batch, "prompt_len": args.prompt_len, "tp": args.tp,
           "tp1_decode_step_ms": round(results["tp1"]["decode_step_ms"], 1),
           f"tp{args.tp}_decode_step_ms": round(results[f"tp{args.tp}"]["decode_step_ms"], 1),
           "tp1_prefill_s": round(results["tp1"]["prefill_s"], 2),
           f"tp{args.tp}_prefill_s": round(results[f"tp{args.tp}"]["prefill_s"], 2),
           "step_message_bytes_per_step": round(sent / steps),
           "allreduce_bytes_per_decode_step_per_rank": allreduce_bytes(model, args.batch, 1, args.tp),
           "allreduce_bytes_per_prefill_token_per_rank": allreduce_bytes(model, 1, 1, args.tp),
           "same_tokens": same}
    print(json.dumps(row, indent=2))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
