"""Batch invariance: every request's greedy tokens equal mlx-lm's own generate for that
prompt alone, whatever the batch, arrival pattern, chunking or preemption."""

import pytest

from shoal.engine.config import EngineConfig
from shoal.engine.llm import LLM
from shoal.engine.model_runner import ModelRunner
from shoal.engine.sampling_params import SamplingParams

from conftest import random_prompts, reference_greedy


def run_staggered(llm: LLM, prompts, max_tokens, arrive_every: int = 3):
    """Add one request every `arrive_every` steps while earlier ones decode."""
    pending = list(zip(prompts, max_tokens))
    requests, steps = [], 0
    while pending or llm.scheduler.has_work():
        if pending and steps % arrive_every == 0:
            prompt, n = pending.pop(0)
            requests.append(llm.add(prompt, SamplingParams(temperature=0, max_tokens=n)))
        if llm.scheduler.has_work():
            llm.step()
        steps += 1
    return [r.output_token_ids for r in requests]


def assert_staggered_matches(model, tokenizer, prompts, max_tokens, num_blocks, budget, max_model_len,
                             **engine) -> LLM:
    """16 staggered requests through the engine give mlx-lm's own greedy tokens; a small pool
    (`num_blocks`) must have forced preemption; every block (and state slot) is free afterwards.
    `engine`: other EngineConfig fields (prefix caching is off unless they turn it on)."""
    expected = [reference_greedy(model, p, n, tokenizer.eos_token_ids) for p, n in zip(prompts, max_tokens)]
    config = EngineConfig(num_blocks=num_blocks, max_num_batched_tokens=budget, block_size=16,
                          max_model_len=max_model_len, **{"enable_prefix_caching": False, **engine})
    llm = LLM(config, ModelRunner.from_model(model, tokenizer, config))
    outputs = run_staggered(llm, prompts, max_tokens)
    for i, (got, want) in enumerate(zip(outputs, expected)):
        assert got == want, f"request {i} (prompt {len(prompts[i])} tokens) diverged"
    if num_blocks is not None:
        assert llm.scheduler.stats.num_preemptions > 0, "the small pool should force preemption"
    assert llm.scheduler.pool.num_free_blocks == llm.scheduler.pool.num_blocks - 1
    states = llm.scheduler.kv.states
    assert states is None or (states.num_free == states.num_slots and not states.req_slot)
    return llm


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("num_blocks,budget", [(None, 512), (48, 96)], ids=["roomy", "preempting"])
def test_staggered_batch_matches_mlx_lm_generate(loaded, family, num_blocks, budget):
    model, tokenizer = loaded[family]
    prompts = random_prompts(16, 1, 300, vocab=model.args.vocab_size - 3, seed=1)
    max_tokens = [1 + (7 * i) % 40 for i in range(16)]
    assert_staggered_matches(model, tokenizer, prompts, max_tokens, num_blocks, budget, 512)


def test_all_at_once_with_chunked_prefill(loaded):
    model, tokenizer = loaded["llama"]
    prompts = random_prompts(8, 100, 250, vocab=256, seed=2)
    expected = [reference_greedy(model, p, 12, tokenizer.eos_token_ids) for p in prompts]
    config = EngineConfig(max_num_batched_tokens=64, block_size=8, max_model_len=512)
    llm = LLM(config, ModelRunner.from_model(model, tokenizer, config))
    assert llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12)) == expected


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_match(loaded, family):
    model, tokenizer = loaded[family]
    prompts = random_prompts(6, 1, 120, vocab=256, seed=12)
    max_tokens = [5, 17, 9, 23, 2, 12]
    expected = [reference_greedy(model, p, n, tokenizer.eos_token_ids) for p, n in zip(prompts, max_tokens)]
    config = EngineConfig(num_blocks=64, max_num_batched_tokens=64, block_size=16, max_model_len=256)
    llm = LLM(config, ModelRunner.from_model(model, tokenizer, config))
    assert run_staggered(llm, prompts, max_tokens, arrive_every=2) == expected
