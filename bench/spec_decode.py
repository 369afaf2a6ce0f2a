"""Speculative decoding (n-gram drafts) on vs off, offline on one engine's model, greedy:

    edit   a source file (~500 tokens) in the prompt, "return it with one change"
    json   a JSON object to echo back with one field changed
    tool   a tool call repeated with another path (the agent case)
    chat   an open question (little to copy)

Decode tokens/s (after every request's first token) at each concurrency, with and without
speculation on the same runner, interleaved; acceptance per draft position; and whether the
greedy outputs are identical.

    python -m shoal.bench.spec_decode --workloads edit chat --concurrency 1 4 16 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from shoal.bench.offline import load_bench_model
from shoal.engine.platform import preload_blas

SOURCE = Path(__file__).resolve().parent.parent / "engine" / "block_pool.py"
RECORD = {"id": 4217, "name": "Ada Lovelace", "email": "ada@example.com", "roles": ["admin", "editor"],
          "address": {"street": "12 Analytical Row", "city": "London", "postcode": "NW1 2AB"},
          "active": True, "last_login": "2026-11-30T08:15:00Z", "quota": {"files": 1200, "bytes": 52428800}}


def prompts(workload: str) -> list[dict[str, str]]:
    if workload == "edit":
        text = SOURCE.read_text()[:2400]
        ask = f"Here is a Python file:\n\n{text}\n\nReturn the whole file unchanged except that `num_free` is renamed to `free_count`."
    elif workload == "json":
        ask = f"Echo this JSON object back exactly, with \"active\" set to false:\n{json.dumps(RECORD, indent=2)}"
    elif workload == "tool":
        call = json.dumps({"name": "read_file", "arguments": {"path": "/home/dev/project/engine/block_pool.py",
                                                              "start_line": 1, "end_line": 120}})
        ask = (f"You called this tool:\n{call}\nIt returned nothing. Call it again the same way, but for "
               "/home/dev/project/engine/scheduler.py. Answer with the JSON call only.")
    else:
        ask = "Tell me a long story about a lighthouse keeper and a storm."
    return [{"role": "user", "content": ask}]


def run(model, tokenizer, prompt: list[int], concurrency: int, max_tokens: int, spec) -> dict[str, Any]:
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm import LLM
    from shoal.engine.model_runner import ModelRunner
    from shoal.engine.sampling_params import SamplingParams

    config = EngineConfig(max_num_seqs=max(concurrency, 1), max_model_len=4096, speculative=spec,
                          enable_prefix_caching=False)
    llm = LLM(config, ModelRunner.from_model(model, tokenizer, config))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    requests = [llm.add(prompt, params) for _ in range(concurrency)]
    while any(r.num_output_tokens == 0 for r in requests):
        llm.step()
    start, first = time.perf_counter(), sum(r.num_output_tokens for r in requests)
    while llm.scheduler.has_work():
        llm.step()
    seconds = time.perf_counter() - start
    stats = llm.scheduler.stats
    return {"tok_per_s": (sum(r.num_output_tokens for r in requests) - first) / seconds, "seconds": seconds,
            "outputs": [r.output_token_ids for r in requests], "drafts": stats.num_spec_drafts,
            "draft_tokens": stats.num_spec_draft_tokens, "accepted": stats.num_spec_accepted_tokens,
            "accepted_per_pos": list(stats.spec_accepted_per_pos)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--workloads", nargs="+", default=["edit", "json", "tool", "chat"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--disable-by-batch-size", type=int, default=1024, help="1024: speculate at every size")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--blas", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    preload_blas(args.blas)
    from shoal.engine.config import SpeculativeConfig

    model, tokenizer, path = load_bench_model(args.model)
    spec = SpeculativeConfig(num_speculative_tokens=args.num_speculative_tokens,
                             disable_by_batch_size=args.disable_by_batch_size)
    rows = []
    print(f"# model {path}; greedy, {args.max_tokens} new tokens; decode tok/s after every first token")
    print("| workload | concurrency | off tok/s | on tok/s | on / off | acceptance | accepted per position | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for workload in args.workloads:
        prompt = tokenizer.apply_chat_template(prompts(workload), add_generation_prompt=True)
        for concurrency in args.concurrency:
            off, on = [], []
            for _ in range(args.repeats):
                off.append(run(model, tokenizer, prompt, concurrency, args.max_tokens, None))
                on.append(run(model, tokenizer, prompt, concurrency, args.max_tokens, spec))
            a, b = max(off, key=lambda r: r["tok_per_s"]), max(on, key=lambda r: r["tok_per_s"])
            rate = b["accepted"] / b["draft_tokens"] if b["draft_tokens"] else 0.0
            per_pos = [round(n / b["drafts"], 2) for n in b["accepted_per_pos"]] if b["drafts"] else []
            same = all(x["outputs"] == off[0]["outputs"] for x in off + on)
            row = {"workload": workload, "concurrency": concurrency, "prompt_tokens": len(prompt),
                   "off": a["tok_per_s"], "on": b["tok_per_s"], "ratio": b["tok_per_s"] / a["tok_per_s"],
                   "acceptance": rate, "accepted_per_pos": per_pos, "identical": same}
            rows.append(row)
            print(f"| {workload} | {concurrency} | {a['tok_per_s']:.1f} | {b['tok_per_s']:.1f} | {row['ratio']:.2f}x | "
                  f"{rate:.0%} | {per_pos} | {same} |", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": path, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
