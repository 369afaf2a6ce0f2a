"""Structured output cost: decode step time at batch B with 0, 1 and B rows constrained by a
tool-call JSON schema, and the first-token time of a new schema against a cached one.

    python -m shoal.bench.structured --batch 16 --steps 16 --rounds 3 --json bench/results/structured.json

The model is the built-in SmolLM2-135M-Instruct (its real 49,152-token vocabulary is what a
mask costs). Every request gets the same kind of prompt and generates past the timed steps
(the schema's `content` needs 2,000+ characters), so the batch never changes while timed.
Configurations are interleaved round by round on the same engine; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from shoal.engine.platform import preload_blas

WRITE_FILE = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": "write_file"},
                             "arguments": {"type": "object", "additionalProperties": False,
                                           "required": ["path", "content"],
                                           "properties": {"path": {"type": "string", "maxLength": 64},
                                                          "content": {"type": "string", "minLength": 2000}}}}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="default (SmolLM2-135M-Instruct) or a model path")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blas", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    blas = preload_blas(args.blas)

    from shoal.bench.offline import load_bench_model
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm import LLM
    from shoal.engine.model_runner import ModelRunner
    from shoal.engine.request import RequestStatus
    from shoal.engine.sampling_params import SamplingParams
    from shoal.engine.structured_output import StructuredOutput

    model, tokenizer, path = load_bench_model(args.model)
    config = EngineConfig(max_model_len=4096, num_blocks=args.batch * 160 + 8, max_num_seqs=args.batch)
    llm = LLM(config, ModelRunner.from_model(model, tokenizer, config, path))
    spec = StructuredOutput.json_schema(WRITE_FILE)
    llm.structured.compile(spec)
    prompt = tokenizer.encode("Write a long README for a Python project as a write_file tool call in JSON.")

    def decode_step_ms(num_constrained: int) -> float:
        params = [SamplingParams(temperature=0.7, seed=i, max_tokens=args.steps + 8, ignore_eos=True,
                                 structured_output=spec if i < num_constrained else None)
                  for i in range(args.batch)]
        requests = [llm.add(prompt + [i], sp) for i, sp in enumerate(params)]
        llm.step()  # prefill (and the first token)
        llm.step()
        start = time.perf_counter()
        for _ in range(args.steps):
            llm.step()
        ms = (time.perf_counter() - start) * 1000 / args.steps
        assert all(r.num_output_tokens == args.steps + 2 for r in requests), "the batch changed while timed"
        while llm.scheduler.has_work():
            for r in requests:
                llm.scheduler.finish_requests([r.request_id], RequestStatus.FINISHED_ABORTED)
            llm.step()
        return ms

    configs = sorted({0, 1, args.batch})
    decode_step_ms(args.batch)  # warm-up: compile and first-use costs out of the figures
    times: dict[int, list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c in configs:
            times[c].append(decode_step_ms(c))
    step = {c: statistics.median(v) for c, v in times.items()}

    def first_token_ms(structured: StructuredOutput | None) -> float:
        start = time.perf_counter()
        if structured is not None:
            llm.structured.compile(structured)  # what the API does before queueing
        request = llm.add(prompt, SamplingParams(temperature=0, max_tokens=1, structured_output=structured))
        while request.num_output_tokens == 0:
            llm.step()
        ms = (time.perf_counter() - start) * 1000
        while llm.scheduler.has_work():
            llm.step()
        return ms

    new_schemas = [StructuredOutput.json_schema({**WRITE_FILE, "title": f"schema {i}"}) for i in range(args.rounds)]
    ttft_new = statistics.median(first_token_ms(s) for s in new_schemas)
    ttft_cached = statistics.median(first_token_ms(new_schemas[0]) for _ in range(args.rounds))
    ttft_plain = statistics.median(first_token_ms(None) for _ in range(args.rounds))
    # The fill alone (what the runner calls each step): B live matchers inside the schema's
    # `content` string, one mask each.
    from types import SimpleNamespace

    from shoal.engine.logits_process import step_bias

    head = tokenizer.encode('{"name":"write_file","arguments":{"path":"README.md","content":"# A project')
    rows = [SimpleNamespace(processors=(llm.structured.processor(spec, head),)) for _ in range(args.batch)]
    start = time.perf_counter()
    for _ in range(20):
        step_bias(rows, llm.structured.vocab_size)
    fill_ms = (time.perf_counter() - start) * 1000 / 20
    result = {"blas": blas, "model": path, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
              "step_ms": {str(c): round(step[c], 2) for c in configs},
              "overhead_all_constrained": round(step[args.batch] / step[0] - 1, 4),
              "overhead_one_constrained": round(step[1] / step[0] - 1, 4),
              "mask_fill_ms_all_rows": round(fill_ms, 3),
              "first_token_ms": {"no_grammar": round(ttft_plain, 1), "cached_schema": round(ttft_cached, 1),
                                 "new_schema": round(ttft_new, 1)}}
    print(json.dumps(result, indent=1))
    print(f"\n| constrained rows of {args.batch} | decode step | vs none |\n|---|---|---|")
    for c in configs:
        print(f"| {c} | {step[c]:.1f} ms | {step[c] / step[0]:.3f}x |")
    print(f"\nmask fill for {args.batch} rows: {fill_ms:.2f} ms a step")
    print(f"first token: no grammar {ttft_plain:.1f} ms, cached schema {ttft_cached:.1f} ms, "
          f"new schema {ttft_new:.1f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
