"""Prefix caching: same-step sharing for swarms, exactness with hits, eviction, salts."""

import numpy as np

from shoal.engine.config import EngineConfig
from shoal.engine.llm import LLM
from shoal.engine.model_runner import ModelRunner, plan_forwards
from shoal.engine.sampling_params import SamplingParams

from conftest import random_prompts


def make_llm(loaded, max_model_len: int = 1200, **kw) -> LLM:
    model, tokenizer = loaded["llama"]
    config = EngineConfig(max_model_len=max_model_len, **kw)
    return LLM(config, ModelRunner.from_model(model, tokenizer, config))


def test_plan_forwards_bounds_padding_and_orders_writers_first():
    assert plan_forwards([1, 1, 1]) == [[0, 1, 2]]
    assert plan_forwards([512, 1, 1]) == [[0], [1, 2]]
    assert plan_forwards([1020] + [28] * 15) == [[0], list(range(1, 16))]
    assert plan_forwards([100, 90, 95, 1, 30, 28]) == [[0, 1, 2], [4, 5], [3]]
    for lengths in ([300, 5, 1, 7, 250, 1, 2], [3] * 9, [64, 1, 63, 60, 2]):
        groups = plan_forwards(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert len(g) * max(lengths[i] for i in g) <= 1.25 * sum(lengths[i] for i in g) or all(lengths[i] == 1 for i in g)


def test_swarm_arriving_together_computes_prefix_once(loaded):
    rng = np.random.default_rng(8)
    system = rng.integers(0, 256, 1000).tolist()
    questions = [rng.integers(0, 256, 20).tolist() for _ in range(16)]
    prompts = [system + q for q in questions]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    off = make_llm(loaded, num_blocks=2000, enable_prefix_caching=False).generate(prompts, params)
    llm = make_llm(loaded, num_blocks=2000)
    requests = [llm.add(p, params) for p in prompts]
    peak_blocks = 0
    while llm.scheduler.has_work():
        llm.step()
        peak_blocks = max(peak_blocks, llm.scheduler.pool.num_blocks - 1 - llm.scheduler.pool.num_free_blocks)
    assert [r.output_token_ids for r in requests] == off
    # Prefill actually computed: one prefix plus each request's own suffix and outputs.
    assert llm.scheduler.stats.num_computed_tokens <= 1000 + 16 * 40
    prefix_blocks, per_request = 1000 // 16, -(-(20 + 8 + 16) // 16)
    assert peak_blocks <= prefix_blocks + 16 * per_request
    assert all(r.num_cached_tokens == 992 for r in requests[1:])
    assert llm.scheduler.kv.num_cache_queries == 16 * 1020 and llm.scheduler.kv.num_cache_hits == 15 * 992
    assert llm.scheduler.pool.num_free_blocks == llm.scheduler.pool.num_blocks - 1


def test_hits_exact_after_eviction_and_preemption(loaded):
    shared = random_prompts(1, 200, 200, vocab=256, seed=9)[0]
    prompts = [shared + p for p in random_prompts(12, 1, 80, vocab=256, seed=10)]
    params = [SamplingParams(temperature=0, max_tokens=10 + i, ignore_eos=True) for i in range(12)]
    off = make_llm(loaded, num_blocks=400, enable_prefix_caching=False).generate(prompts, params)
    llm = make_llm(loaded, 360, num_blocks=24, max_num_batched_tokens=128)  # tiny: evicts and preempts
    got = []
    for i in range(0, 12, 4):  # waves: later waves hit (or miss, after eviction) earlier blocks
        got += llm.generate(prompts[i:i + 4], params[i:i + 4])
    assert got == off
    assert llm.scheduler.stats.num_preemptions > 0 and llm.scheduler.kv.num_cache_hits > 0
    assert llm.scheduler.pool.num_free_blocks == 23


def test_cache_salt_isolates_tenants(loaded):
    llm = make_llm(loaded, num_blocks=200)
    prompt = random_prompts(1, 100, 100, vocab=256, seed=11)[0]
    params = SamplingParams(temperature=0, max_tokens=2)
    first = llm.add(prompt, params)
    while llm.scheduler.has_work():
        llm.step()
    from shoal.engine.request import Request
    for salt, expected in ((None, 96), ("tenant-b", 0)):
        req = Request(f"s-{salt}", prompt, params, cache_salt=salt)
        llm.scheduler.add_request(req)
        while llm.scheduler.has_work():
            llm.step()
        assert req.num_cached_tokens == expected
    assert first.num_cached_tokens == 0
