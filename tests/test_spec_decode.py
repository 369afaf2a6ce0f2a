"""Speculative decoding with n-gram drafts verified inside the continuous batch: the proposer;
the scheduler's drafts, rollback and block trimming fed with fake outputs; greedy outputs
token-identical with speculation on and off (and to mlx-lm) on a random llama (drafts mostly
rejected) and on a bigram model whose outputs cycle (drafts mostly accepted), with staggered
arrivals, chunked prefill, preemption, prefix hits and cascade; sampled rows keep their
distribution; recurrent models turn it off."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

from shoal.engine.config import EngineConfig, SpeculativeConfig
from shoal.engine.llm import LLM
from shoal.engine.model_runner import ModelRunner
from shoal.engine.outputs import ModelRunnerOutput
from shoal.engine.request import Request, RequestStatus
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler, SchedulerConfig
from shoal.engine.spec_decode.ngram import NgramProposer

from conftest import random_prompts, reference_greedy
from test_batch_invariance import assert_staggered_matches

SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1, disable_by_batch_size=64)


def test_ngram_proposer_takes_the_latest_longest_match():
    p = NgramProposer(3, min_n=1, max_n=3)
    assert p.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]) == (7, 8, 1)  # the latest "1 2 3"
    assert p.propose([5, 6, 7, 5, 6]) == (7, 5, 6)
    assert p.propose([1, 2, 3, 4]) == ()  # nothing recurs
    assert p.propose([4, 4, 4], max_tokens=1) == (4,)
    assert NgramProposer(4, min_n=2).propose([9, 1, 2, 9, 9, 1, 2]) == (9, 9, 1, 2)


def make_scheduler(num_blocks=32, budget=64, block_size=4) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=(num_blocks - 1) * block_size,
                                     block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=False,
                                     speculative=SPEC))


def test_drafts_are_scheduled_rolled_back_and_their_blocks_trimmed():
    s = make_scheduler()
    req = Request("a", [1, 2, 3, 1, 2], SamplingParams(max_tokens=20), frozenset({0}))
    s.add_request(req)
    out = s.schedule()  # the prompt
    s.update_from_output(out, ModelRunnerOutput((3,)))  # ... 1 2 3: "1 2 3" recurs
    out = s.schedule()
    row = out.scheduled[0]
    assert (row.token_ids, row.start_pos, row.num_draft_tokens) == ((3, 1, 2, 3), 5, 3)  # what followed "1 2 3"
    assert len(s.kv.req_blocks["a"]) == 3  # positions 0..8
    free = s.pool.num_free_blocks
    s.update_from_output(out, ModelRunnerOutput(((1, 2, 9),)))  # two drafts agree, then 9
    assert req.output_token_ids == [3, 1, 2, 9] and req.num_computed_tokens == 8
    assert len(s.kv.req_blocks["a"]) == 3 and s.pool.num_free_blocks == free  # position 8 is in block 2
    assert (s.stats.num_spec_drafts, s.stats.num_spec_draft_tokens, s.stats.num_spec_accepted_tokens) == (1, 3, 2)
    assert s.stats.spec_accepted_per_pos == [1, 1, 0, 0]


def test_a_stop_inside_the_accepted_tokens_ends_the_request_there():
    s = make_scheduler()
    req = Request("a", [5, 0, 6, 5, 0, 6], SamplingParams(max_tokens=20), frozenset({0}))  # 0 is EOS
    s.add_request(req)
    s.update_from_output(s.schedule(), ModelRunnerOutput((5,)))
    out = s.schedule()
    drafts = out.scheduled[0].token_ids[1:]
    assert drafts[0] == 0  # "6 5" was followed by EOS
    s.update_from_output(out, ModelRunnerOutput((drafts + (8,),)))  # every draft holds
    assert req.output_token_ids == [5, 0] and req.status == RequestStatus.FINISHED_STOPPED
    assert s.pool.num_free_blocks == s.pool.num_blocks - 1


def test_drafts_never_run_past_max_tokens():
    s = make_scheduler()
    req = Request("a", [1, 2, 1, 2, 1], SamplingParams(max_tokens=3), frozenset({0}))
    s.add_request(req)
    s.update_from_output(s.schedule(), ModelRunnerOutput((2,)))
    out = s.schedule()
    assert out.scheduled[0].num_draft_tokens == 1  # 2 tokens left: one draft and one more token


def test_rows_that_need_per_token_state_get_no_drafts():
    s = make_scheduler()
    for i, params in enumerate([SamplingParams(max_tokens=9, stop=("x",)), SamplingParams(max_tokens=9, logprobs=True),
                                SamplingParams(max_tokens=9, presence_penalty=1.0),
                                SamplingParams(max_tokens=9, logit_bias=((3, 1.0),))]):
        s.add_request(Request(f"r{i}", [1, 2, 1, 2, 1], params, frozenset({0})))
    s.update_from_output(out := s.schedule(), ModelRunnerOutput((2,) * 4))
    assert all(r.num_draft_tokens == 0 for r in s.schedule().scheduled)


@pytest.fixture(scope="module")
def bigram(tmp_path_factory):
    """A model whose next token depends only on the last one: its greedy output cycles."""
    from mlx_lm import load

    from shoal.bench.scripted_model import make_scripted_model

    return load(str(make_scripted_model(tmp_path_factory.mktemp("bigram"), {"x": ["AB"]})))


def run(model, tokenizer, prompts, params, spec, **kw) -> tuple[list[list[int]], LLM]:
    config = EngineConfig(**{"max_model_len": 512, "num_blocks": 120, "speculative": spec, **kw})
    llm = LLM(config, ModelRunner.from_model(model, tokenizer, config))
    return llm.generate(prompts, params), llm


@pytest.mark.parametrize("backend", ["gather", "cascade"])
def test_greedy_outputs_are_identical_with_and_without_drafts(loaded, bigram, backend):
    for name, (model, tokenizer) in (("llama", loaded["llama"]), ("bigram", bigram)):
        shared = random_prompts(1, 40, 40, vocab=120, seed=1)[0]
        prompts = [shared + p * 3 for p in random_prompts(6, 4, 20, vocab=120, seed=2)]
        params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
        expected = [reference_greedy(model, p, 60) for p in prompts]
        off, _ = run(model, tokenizer, prompts, params, None, attention_backend=backend)
        on, llm = run(model, tokenizer, prompts, params, SPEC, attention_backend=backend)
        assert on == off == expected, name
        stats = llm.scheduler.stats
        assert stats.num_spec_drafts > 20, name
        if name == "bigram":  # its cycles are copied: most drafts hold
            assert stats.num_spec_accepted_tokens > stats.num_spec_draft_tokens / 2
        assert llm.scheduler.pool.num_free_blocks == llm.scheduler.pool.num_blocks - 1
        assert llm.scheduler.kv.num_cache_hits > 0  # the shared prefix


def test_staggered_chunked_and_preempted_with_drafts(loaded):
    model, tokenizer = loaded["llama"]
    prompts = [p * 2 for p in random_prompts(16, 1, 60, vocab=120, seed=5)]
    max_tokens = [1 + (7 * i) % 40 for i in range(16)]
    llm = assert_staggered_matches(model, tokenizer, prompts, max_tokens, 20, 32, 256, speculative=SPEC)
    stats = llm.scheduler.stats
    assert stats.num_spec_drafts > 20 and stats.num_spec_accepted_tokens > 0


def test_sampled_rows_keep_their_distribution(loaded):
    """Rejection sampling against n-gram drafts leaves the output distribution unchanged. The
    model's forward is replaced by fixed next-token distributions over tokens 0-2 that depend
    on the position's parity, so the exact law of the first four tokens is known: 400 seeded
    temperature-1 requests with drafts (most proposed, some accepted) match it (chi-square).
    Accepting drafts blindly, or verifying a draft with another position's logits, fails."""
    import mlx.core as mx

    model, tokenizer = loaded["llama"]
    laws = {0: np.array([0.5, 0.3, 0.2]), 1: np.array([0.15, 0.25, 0.6])}
    config = EngineConfig(max_model_len=512, num_blocks=400, max_num_seqs=32, speculative=SPEC)
    llm = LLM(config, ModelRunner.from_model(model, tokenizer, config))
    vocab = llm.runner.info.vocab_size

    def fixed(rows):
        positions = [r.start_pos + len(r.token_ids) - 1 - r.num_draft_tokens + j
                     for r in rows for j in range(1 + r.num_draft_tokens)]
        logits = np.full((len(positions), vocab), -1e9, dtype=np.float32)
        for i, position in enumerate(positions):
            logits[i, :3] = np.log(laws[position % 2])
        return mx.array(logits)

    llm.runner._forward = fixed
    prompt = [0, 1, 2, 0, 2, 1, 1, 0, 0, 2, 2]  # every pair recurs: the drafts are what followed
    params = [SamplingParams(temperature=1.0, max_tokens=4, seed=s, ignore_eos=True) for s in range(400)]
    outputs = llm.generate([prompt] * 400, params)
    stats = llm.scheduler.stats
    assert stats.num_spec_drafts > 400 and stats.num_spec_accepted_tokens > 100
    counts = Counter(tuple(o) for o in outputs)
    outcomes = [(a, b, c, d) for a in range(3) for b in range(3) for c in range(3) for d in range(3)]
    parity = (len(prompt) - 1) % 2  # the first token comes from the last prompt position's logits
    expected = np.array([400 * np.prod([laws[(parity + i) % 2][t] for i, t in enumerate(o)]) for o in outcomes])
    seen = np.array([counts[o] for o in outcomes], dtype=float)
    assert seen.sum() == 400
    rare = expected < 5  # pooled into one cell
    e, o = np.append(expected[~rare], expected[rare].sum()), np.append(seen[~rare], seen[rare].sum())
    chi2 = (((o - e) ** 2) / e).sum()
    assert chi2 < len(e) + 5 * np.sqrt(2 * len(e)), (chi2, len(e))


def test_recurrent_models_turn_drafts_off(hybrid_families, caplog):
    model, tokenizer = hybrid_families["qwen3_5"]
    with caplog.at_level(logging.INFO, logger="shoal"):
        _, llm = run(model, tokenizer, [[1, 2, 3] * 5], SamplingParams(temperature=0, max_tokens=8), SPEC)
    assert "speculative decoding is off" in caplog.text and llm.scheduler.proposer is None
