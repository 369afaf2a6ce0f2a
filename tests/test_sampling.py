"""Per-request sampling inside one batch, and SamplingParams validation."""

import mlx.core as mx
import numpy as np
import pytest

from shoal.engine.config import EngineConfig
from shoal.engine.llm import LLM
from shoal.engine.model_runner import ModelRunner
from shoal.engine.sampler import apply_filters
from shoal.engine.sampling_params import SamplingParams, SamplingParamsError

from conftest import random_prompts, reference_greedy


def make_llm(loaded, **kw) -> LLM:
    model, tokenizer = loaded["llama"]
    config = EngineConfig(num_blocks=128, max_model_len=512, **kw)
    return LLM(config, ModelRunner.from_model(model, tokenizer, config))


def test_greedy_row_exact_beside_sampling_rows_and_seeds_repeat(loaded):
    model, tokenizer = loaded["llama"]
    prompt = random_prompts(1, 30, 30, vocab=256, seed=5)[0]
    expected = reference_greedy(model, prompt, 32)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    hot = [SamplingParams(temperature=1.0, seed=s, max_tokens=32, ignore_eos=True) for s in (11, 12)]
    out1 = make_llm(loaded).generate([prompt] * 3, [greedy] + hot)
    out2 = make_llm(loaded).generate([prompt] * 3, [hot[0], greedy, hot[1]])  # other rows, other order
    assert out1[0] == expected and out2[1] == expected
    assert out1[1] != expected and out1[1] != out1[2]  # sampled rows really sample
    assert out1[1] == out2[0] and out1[2] == out2[2]  # same seed, same tokens, whatever the batch


def test_top_k_one_is_greedy_and_filters_mask(loaded):
    model, tokenizer = loaded["llama"]
    prompt = random_prompts(1, 12, 12, vocab=256, seed=6)[0]
    params = SamplingParams(temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True, seed=3)
    assert make_llm(loaded).generate([prompt], params)[0] == reference_greedy(model, prompt, 16)
    logits = mx.array(np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]], dtype=np.float32)))
    kept = apply_filters(logits, np.array([0, 2]), np.array([0.7, 1.0], dtype=np.float32),
                         np.array([0.0, 0.0], dtype=np.float32))
    assert np.isfinite(np.array(kept)).tolist() == [[True, True, False, False], [True, True, False, False]]
    kept = apply_filters(logits, np.array([0, 0]), np.array([1.0, 1.0], dtype=np.float32),
                         np.array([0.5, 0.0], dtype=np.float32))
    assert np.isfinite(np.array(kept)).tolist() == [[True, True, False, False], [True] * 4]


def test_penalties_bias_min_tokens_and_logprobs(loaded):
    prompt = random_prompts(1, 8, 8, vocab=256, seed=7)[0]
    llm = make_llm(loaded)
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = llm.generate([prompt], base)[0]
    biased = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                   logit_bias=((42, 100.0),)))[0]
    assert biased == [42] * 4
    penalized = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                      frequency_penalty=2.0, presence_penalty=2.0))[0]
    assert len(set(penalized)) > len(set(plain)) or len(set(plain)) == 24
    assert max(penalized.count(t) for t in set(penalized)) <= max(plain.count(t) for t in set(plain))
    eos = next(iter(llm.runner.info.eos_token_ids))
    forced = SamplingParams(temperature=0, max_tokens=6, min_tokens=3, logit_bias=((eos, 100.0),))
    req = llm.add(prompt, forced)
    while llm.scheduler.has_work():
        llm.step()
    assert req.output_token_ids[:3] != [eos] * 3 and eos not in req.output_token_ids[:3]
    assert req.output_token_ids[3] == eos and req.num_output_tokens == 4  # stops at EOS after min_tokens
    req = llm.add(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=3))
    sched = llm.scheduler.schedule()
    result = llm.runner.execute(sched)
    lp = result.logprobs[0]
    assert lp.token_id == result.sampled_token_ids[0] == plain[0]
    assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id and lp.top[0][1] == pytest.approx(lp.logprob)
    assert lp.logprob <= 0 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("max_tokens", 0), ("seed", -1), ("top_logprobs", 21), ("stop", ("",)), ("stop_token_ids", (-1,)),
])
def test_invalid_params_name_the_parameter(field, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field and field in str(info.value)


def test_min_tokens_above_max_tokens():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(max_tokens=2, min_tokens=3)
    assert info.value.param == "min_tokens"
