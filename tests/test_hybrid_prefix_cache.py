"""Prefix caching on hybrid models (recurrent layers beside attention) through state snapshots,
on tiny random qwen3_5 and qwen3_next (Gated DeltaNet; experts in the latter), lfm2 (short
convolutions) and nemotron_h (Mamba-2) models: a multi-turn conversation restores the previous answer's last snapshot and computes only
what is new; a swarm computes its shared prompt once; shared prefixes with chunked prefill and
preemption; a snapshot holds mlx-lm's own state after exactly its tokens. Every output equals
mlx-lm's generate (and the engine with caching off) token for token."""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest

from shoal.engine.config import EngineConfig
from shoal.engine.llm import LLM
from shoal.engine.model_runner import ModelRunner
from shoal.engine.sampling_params import SamplingParams

from conftest import random_prompts, reference_greedy
from test_batch_invariance import assert_staggered_matches

FAMILIES = ("qwen3_5", "qwen3_next", "lfm2", "nemotron_h")
BS = 16


@pytest.fixture(scope="module")
def families(hybrid_families) -> dict:
    return hybrid_families


def engine(model, tokenizer, **kw) -> LLM:
    config = EngineConfig(**{"block_size": BS, "max_model_len": 1024, "num_blocks": 160, "snapshot_interval": 64, **kw})
    return LLM(config, ModelRunner.from_model(model, tokenizer, config))


def assert_snapshots_settled(llm: LLM) -> None:
    """Nothing reserved or pinned, every block and slot free."""
    s = llm.scheduler
    snaps = s.kv.snapshots
    assert snaps.num_free + snaps.num_published == snaps.num_snapshots and not snaps._pins
    assert s.pool.num_free_blocks == s.pool.num_blocks - 1 and s.kv.states.num_free == s.kv.states.num_slots


@pytest.mark.parametrize("family", FAMILIES)
def test_a_conversation_computes_only_its_new_tokens(families, family):
    """Four turns, each the previous prompt + its answer + a user message: every follow-up
    restores the snapshot at the last full block of the previous answer, computes the rest,
    and answers as mlx-lm (and the engine without prefix caching) does."""
    model, tokenizer = families[family]
    eos = tokenizer.eos_token_ids
    cached, plain = engine(model, tokenizer), engine(model, tokenizer, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=20)
    conversation = random_prompts(1, 150, 150, vocab=256, seed=1)[0]
    previous = 0  # tokens of the conversation the last turn computed (its prompt + answer - 1)
    for turn in range(4):
        want = reference_greedy(model, conversation, 20, eos)
        request = cached.add(conversation, params)
        while cached.scheduler.has_work():
            cached.step()
        assert request.output_token_ids == want == plain.generate([conversation], params)[0], f"turn {turn}"
        assert request.num_cached_tokens == previous // BS * BS, f"turn {turn}"
        previous = request.num_tokens - 1
        conversation = conversation + want + random_prompts(1, 10, 10, vocab=256, seed=turn + 10)[0]
    assert cached.scheduler.kv.num_snapshot_hits == 3
    assert_snapshots_settled(cached)


@pytest.mark.parametrize("backend", ["gather", "cascade"])
def test_a_swarm_computes_its_shared_prompt_once(families, backend):
    """Eight agents with one 128-token system prompt arrive together: the first computes it,
    the others wait for its snapshot at 128 and compute only their own turns; their decodes
    share those blocks, which cascade attention reads once for all."""
    model, tokenizer = families["qwen3_5"]
    system = random_prompts(1, 128, 128, vocab=256, seed=3)[0]
    prompts = [system + turn for turn in random_prompts(8, 5, 12, vocab=256, seed=4)]
    expected = [reference_greedy(model, p, 6, tokenizer.eos_token_ids) for p in prompts]
    llm = engine(model, tokenizer, max_num_batched_tokens=512, attention_backend=backend)
    requests = [llm.add(p, SamplingParams(temperature=0, max_tokens=6)) for p in prompts]
    while llm.scheduler.has_work():
        llm.step()
    assert [r.output_token_ids for r in requests] == expected
    assert [r.num_cached_tokens for r in requests] == [0] + [128] * 7
    computed = llm.scheduler.stats.num_computed_tokens - sum(r.num_output_tokens - 1 for r in requests)
    assert computed == sum(len(p) for p in prompts) - 7 * 128
    assert (llm.runner.attention.num_cascade_forwards >= 5) == (backend == "cascade")
    assert_snapshots_settled(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefixes_with_chunks_and_preemption(families, family):
    """16 staggered requests, half of them sharing one of two 40-token prefixes, through a pool
    small enough to preempt and a 32-token budget: exact, with snapshot hits."""
    model, tokenizer = families[family]
    heads = random_prompts(2, 40, 40, vocab=256, seed=6)
    tails = random_prompts(16, 1, 50, vocab=256, seed=7)
    prompts = [(heads[i % 2] if i % 4 < 2 else []) + t for i, t in enumerate(tails)]
    max_tokens = [1 + (7 * i) % 30 for i in range(16)]
    llm = assert_staggered_matches(model, tokenizer, prompts, max_tokens, 20, 32, 256,
                                   enable_prefix_caching=True, snapshot_interval=32)
    assert llm.scheduler.kv.num_snapshot_hits > 0
    assert_snapshots_settled(llm)


@pytest.mark.parametrize("family", ["qwen3_5", "nemotron_h"])
def test_a_snapshot_is_the_state_after_exactly_its_tokens(families, family):
    """The snapshot a step takes at a boundary equals mlx-lm's cache after exactly that many
    tokens, and differs from the state one token before or after (so the test can fail)."""
    model, tokenizer = families[family]
    prompt = random_prompts(1, 50, 50, vocab=256, seed=9)[0]
    llm = engine(model, tokenizer, snapshot_interval=32)
    taken: dict[int, int] = {}  # boundary -> snapshot id
    execute = llm.runner.execute

    def spy(sched):
        for r in sched.scheduled:
            if r.take_snapshot is not None:
                taken[r.start_pos + len(r.token_ids)] = r.take_snapshot
        return execute(sched)

    llm.runner.execute = spy
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    assert sorted(taken) == [32, 48]  # the interval, and the prompt's last full block

    def mlx_lm_states(n: int) -> list[np.ndarray]:
        """mlx-lm's own cache after the first n tokens, fed in the engine's chunks (up to 32)."""
        from mlx_lm.models.cache import ArraysCache

        cache = model.make_cache()
        for start in range(0, n, 32):
            mx.eval(model(mx.array([prompt[start:min(n, start + 32)]]), cache=cache))
        return [np.array(a[0]) for c in cache if isinstance(c, ArraysCache) for a in c.cache]

    for boundary, snap in taken.items():
        ours = [np.array(a[snap]) for c in llm.runner.state_caches for a in c.snapshots]
        for n in (boundary - 1, boundary, boundary + 1):
            same = all(np.array_equal(x, y) for x, y in zip(ours, mlx_lm_states(n)))
            assert same == (n == boundary), f"snapshot at {boundary} vs mlx-lm after {n} tokens"
