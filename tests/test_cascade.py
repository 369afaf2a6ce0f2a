"""Cascade attention: the merge against reference attention, the grouping, and greedy swarms
token for token equal to the gather path (one and several prefixes, mid-block prefixes, rows
that share nothing, chunked prefill, preemption, aborts), and a 16 x 12k swarm computing each
prompt token once."""

import mlx.core as mx
import numpy as np
import pytest

from shoal.engine.attention import CASCADE_MIN_PREFIX_TOKENS, CASCADE_MIN_SAVED_TOKENS, AttentionSelector
from shoal.engine.config import EngineConfig
from shoal.engine.llm import LLM
from shoal.engine.model_runner import ModelRunner
from shoal.engine.request import RequestStatus
from shoal.engine.sampling_params import SamplingParams
from shoal.kernels.cascade import (attention_with_lse, build_cascade_indices, cascade_attention,
                                   merge_attention, plan_cascade, prefix_attention)
from shoal.kernels.paged_attention import attention, build_step_indices, paged_attention, write_kv

from conftest import random_prompts


def rand(rng, *shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("heads,kv_heads,length", [(6, 2, 1), (6, 2, 5), (4, 4, 3), (8, 1, 2)])
def test_merge_equals_attention_over_the_union(heads, kv_heads, length):
    rng = np.random.default_rng(heads * 10 + length)
    rows, dim, prefix, suffix = 3, 16, 37, 11
    q = rand(rng, rows, heads, length, dim)
    kp, vp = rand(rng, kv_heads, prefix, dim), rand(rng, kv_heads, prefix, dim)
    ks, vs = rand(rng, rows, kv_heads, suffix, dim), rand(rng, rows, kv_heads, suffix, dim)
    # Causal within the suffix, ragged: row r's queries sit at suffix positions ending at 10 - r.
    q_pos = (suffix - 1 - np.arange(rows))[:, None] - np.arange(length)[::-1][None, :]
    mask = np.arange(suffix)[None, None, None, :] <= q_pos[:, None, :, None]
    out_s, lse_s = attention_with_lse(q, ks, vs, 0.25, mx.array(mask))
    out_p, lse_p = prefix_attention(q, kp, vp, 0.25)
    merged = merge_attention(out_s, lse_s, out_p, lse_p)

    keys = mx.concatenate([mx.broadcast_to(kp[None], (rows, kv_heads, prefix, dim)), ks], axis=2)
    values = mx.concatenate([mx.broadcast_to(vp[None], (rows, kv_heads, prefix, dim)), vs], axis=2)
    full_mask = np.concatenate([np.ones((rows, 1, length, prefix), bool), mask], axis=-1)
    reference = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.25, mask=mx.array(full_mask))
    assert mx.abs(merged - reference).max().item() < 1e-5
    # The suffix part alone is the reference kernel's result, and an empty prefix
    # (lse = -inf) leaves it bit for bit as it is.
    assert mx.abs(out_s - attention(q, ks, vs, 0.25, mx.array(mask))).max().item() < 1e-6
    empty = merge_attention(out_s, lse_s, mx.zeros_like(out_s), mx.full(lse_s.shape, -mx.inf))
    assert mx.array_equal(empty, out_s)
    # The log-sum-exp is that of the scaled, masked scores.
    scores = (q[:, :1] * 0.25) @ ks[:, :1].swapaxes(-1, -2)
    scores = mx.where(mx.array(mask), scores, -mx.inf)
    assert mx.allclose(lse_s[:, :1], mx.logsumexp(scores, axis=-1), atol=1e-5)


def test_cascade_over_the_pool_equals_paged_attention():
    """Rows with two shared prefixes (one ending mid-block for the text, shared as whole
    blocks only), a row sharing nothing, decode and chunk queries: equal to the gather path."""
    rng = np.random.default_rng(3)
    bs, kv_heads, heads, dim, num_blocks = 4, 2, 6, 8, 64
    num_slots = bs * num_blocks
    k_pool, v_pool = rand(rng, kv_heads * num_slots, dim), rand(rng, kv_heads * num_slots, dim)
    tables = [(1, 2, 3, 4, 10, 11), (1, 2, 3, 4, 12, 13), (1, 2, 3, 14, 15),
              (5, 6, 7, 16), (5, 6, 7, 17, 18), (20, 21, 22)]
    starts, lengths = [21, 18, 13, 13, 17, 9], [2, 3, 1, 2, 2, 3]
    idx = build_step_indices(tables, starts, lengths, bs, num_slots, kv_heads)
    limits = np.minimum(np.asarray(starts) // bs, [len(t) for t in tables])
    groups = plan_cascade(idx.tables, limits, 1)
    assert [(g.tolist(), n) for g, n in groups] == [([0, 1, 2], 3), ([3, 4], 3)]
    q = rand(rng, len(tables), heads, max(lengths), dim)
    cascade = build_cascade_indices(idx.tables, np.asarray(starts), np.asarray(lengths), groups, bs,
                                    num_blocks, kv_heads)
    got = cascade_attention(q, k_pool, v_pool, cascade, 0.3, kv_heads, bs)
    want = paged_attention(q, k_pool, v_pool, mx.array(idx.gather_blocks), mx.array(idx.mask), 0.3, bs)
    for r, n in enumerate(lengths):  # padding queries past a row's length are never read
        assert mx.abs(got[r, :, :n] - want[r, :, :n]).max().item() < 1e-5
    # The row in no group (5) is the reference kernel's answer.
    keys = mx.take(k_pool.reshape(-1, bs, dim), mx.array(idx.gather_blocks), axis=0).reshape(6, kv_heads, -1, dim)
    values = mx.take(v_pool.reshape(-1, bs, dim), mx.array(idx.gather_blocks), axis=0).reshape(6, kv_heads, -1, dim)
    plain = attention(q, keys, values, 0.3, mx.array(idx.mask))
    assert mx.abs(got[5, :, :3] - plain[5, :, :3]).max().item() < 1e-6


def test_plan_picks_the_grouping_that_saves_most():
    t = np.array([[1, 2, 3, 4, 9], [1, 2, 3, 4, 10], [1, 2, 3, 5, 11], [7, 8, 0, 0, 0], [7, 8, 12, 0, 0]])
    full = np.array([5, 5, 5, 2, 3])
    assert [(g.tolist(), n) for g, n in plan_cascade(t, full, 1)] == [([0, 1, 2], 3), ([3, 4], 2)]
    # Cost rule: groups below min_blocks are left to the gather path.
    assert [(g.tolist(), n) for g, n in plan_cascade(t, full, 4)] == [([0, 1], 4)]
    # A row still computing the prefix (limit 0) is in no group.
    assert [(g.tolist(), n) for g, n in plan_cascade(t, np.array([0, 5, 5, 2, 3]), 3)] == [([1, 2], 3)]
    # Deeper subgroups beat one shallow group when they save more reads: 2 x 3 x 9 > 7 x 1.
    deep = np.array([[1] + [2] * 8 + [i] for i in range(4)] + [[1] + [3] * 8 + [i] for i in range(4, 8)])
    deep[:, 1:9] += np.repeat(np.arange(8)[None, :], 8, axis=0) * 10
    groups = plan_cascade(deep, np.full(8, 10), 1)
    assert [(g.tolist(), n) for g, n in groups] == [([0, 1, 2, 3], 9), ([4, 5, 6, 7], 9)]
    assert plan_cascade(t[:1], full[:1], 1) == []


def make_llm(loaded, backend: str, family: str = "llama", max_model_len: int = 2048, **kw) -> LLM:
    model, tokenizer = loaded[family]
    config = EngineConfig(max_model_len=max_model_len, attention_backend=backend, **kw)
    return LLM(config, ModelRunner.from_model(model, tokenizer, config))


def run_both(loaded, prompts, params, family="llama", **kw):
    """(gather outputs, cascade outputs, cascade LLM)."""
    want = make_llm(loaded, "gather", family, **kw).generate(prompts, params)
    llm = make_llm(loaded, "cascade", family, **kw)
    got = llm.generate(prompts, params)
    return want, got, llm


def swarm(seed: int, prefix_lens: list[int], per_prefix: int, suffix=(5, 40), vocab=256):
    rng = np.random.default_rng(seed)
    prompts = []
    for n in prefix_lens:
        shared = rng.integers(0, vocab, n).tolist()
        prompts += [shared + rng.integers(0, vocab, int(rng.integers(*suffix))).tolist()
                    for _ in range(per_prefix)]
    order = rng.permutation(len(prompts))
    return [prompts[i] for i in order]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_swarm_one_prefix_greedy_equal(loaded, family):
    prompts = swarm(1, [300], 12)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want, got, llm = run_both(loaded, prompts, params, family, num_blocks=600)
    assert got == want
    assert llm.runner.attention.num_cascade_forwards >= 11  # every decode step, at least
    assert llm.scheduler.pool.num_free_blocks == llm.scheduler.pool.num_blocks - 1


def test_several_prefixes_mid_block_and_unshared_rows(loaded):
    # Prefixes of 203, 77 and 150 tokens: none ends on a block boundary. Plus 4 lone prompts.
    prompts = swarm(2, [203, 77, 150], 5) + random_prompts(4, 30, 90, vocab=256, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=6 + i % 7, ignore_eos=True) for i in range(len(prompts))]
    want, got, llm = run_both(loaded, prompts, params, num_blocks=800)
    assert got == want
    assert llm.runner.attention.num_cascade_forwards > 0


def test_chunked_prefill_of_followers_and_arrivals_mid_decode(loaded):
    """Followers arrive while the swarm decodes, and their long own turns prefill in chunks
    next to decoding rows of the same prefix."""
    prompts = swarm(3, [260], 10, suffix=(60, 200))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    def run(backend):
        llm = make_llm(loaded, backend, num_blocks=700, max_num_batched_tokens=64)
        requests = [llm.add(p, params) for p in prompts[:4]]
        for p in prompts[4:]:
            for _ in range(3):
                llm.step()
            requests.append(llm.add(p, params))
        while llm.scheduler.has_work():
            llm.step()
        return [r.output_token_ids for r in requests], llm

    want, _ = run("gather")
    got, llm = run("cascade")
    assert got == want
    assert llm.runner.attention.num_cascade_forwards > 0


def test_preemption_and_aborts_mid_swarm(loaded):
    prompts = swarm(4, [180, 120], 8)
    params = [SamplingParams(temperature=0, max_tokens=40 + 2 * i, ignore_eos=True) for i in range(len(prompts))]
    aborted = {3, 9, 14}

    def run(backend):
        llm = make_llm(loaded, backend, max_model_len=400, num_blocks=45, max_num_batched_tokens=128)  # tight: preempts
        requests = [llm.add(p, sp) for p, sp in zip(prompts, params)]
        steps = 0
        while llm.scheduler.has_work():
            llm.step()
            steps += 1
            if steps == 12:
                llm.scheduler.finish_requests([requests[i].request_id for i in aborted],
                                              RequestStatus.FINISHED_ABORTED)
        return [r.output_token_ids for r in requests], llm

    want, _ = run("gather")
    got, llm = run("cascade")
    assert got == want
    assert llm.scheduler.stats.num_preemptions > 0
    assert llm.runner.attention.num_cascade_forwards > 0
    assert all(len(got[i]) < params[i].max_tokens for i in aborted)
    assert llm.scheduler.pool.num_free_blocks == llm.scheduler.pool.num_blocks - 1


def test_auto_uses_cascade_only_past_the_cost_rule():
    def backend(mode, rows, prefix_tokens):
        selector = AttentionSelector(mode, 16, 16 * 2000, 2)
        shared = tuple(range(1, 1 + prefix_tokens // 16))
        tables = [shared + (1500 + i,) for i in range(rows)]
        return selector.step_context(tables, [prefix_tokens + 8] * rows, [1] * rows).backend.name

    enough = CASCADE_MIN_SAVED_TOKENS // CASCADE_MIN_PREFIX_TOKENS + 1
    assert backend("auto", enough, CASCADE_MIN_PREFIX_TOKENS) == "cascade"
    assert backend("auto", enough, CASCADE_MIN_PREFIX_TOKENS - 16) == "gather"  # prefix too short
    assert backend("auto", enough - 1, CASCADE_MIN_PREFIX_TOKENS) == "gather"  # too few reads saved
    assert backend("auto", 2, CASCADE_MIN_SAVED_TOKENS) == "cascade"
    assert backend("auto", 1, 20_000) == "gather"
    assert backend("gather", 64, 8192) == "gather"
    assert backend("cascade", 2, 16) == "cascade"


def test_swarm_16_x_12k_computes_each_prompt_token_once(loaded):
    """Sixteen agents arriving together with one 12,000-token system prompt: the prompt is
    computed once, its blocks held once, and the decode steps attend it once per step."""
    rng = np.random.default_rng(12)
    system = rng.integers(0, 256, 12_000).tolist()
    turns = [rng.integers(0, 256, 64).tolist() for _ in range(16)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = make_llm(loaded, "auto", max_model_len=12_200, num_blocks=1300)
    requests = [llm.add(system + t, params) for t in turns]
    peak = 0
    while llm.scheduler.has_work():
        llm.step()
        peak = max(peak, llm.scheduler.pool.num_blocks - 1 - llm.scheduler.pool.num_free_blocks)
    # 12,000 shared tokens, 16 x 64 own tokens, and each request's outputs but the last
    # (the last sampled token is never fed back).
    assert llm.scheduler.stats.num_computed_tokens == 12_000 + 16 * 64 + 16 * 7
    assert all(r.num_cached_tokens == 12_000 // 16 * 16 for r in requests[1:])
    shared_blocks, own_blocks = 12_000 // 16, -(-(12_000 % 16 + 64 + 8) // 16)
    assert peak <= shared_blocks + 16 * own_blocks
    assert llm.runner.attention.num_cascade_forwards >= 7
    # Outputs equal the gather path's for the first agents (cheaper to check than all 16).
    ref = make_llm(loaded, "gather", max_model_len=12_200, num_blocks=1300)
    assert ref.generate([system + t for t in turns[:2]], params) == [r.output_token_ids for r in requests[:2]]
