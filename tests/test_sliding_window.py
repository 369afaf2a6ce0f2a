"""Sliding-window layers in the paged engine, on tiny random models of gemma3_text (every
second layer attends only its last W tokens) and gpt_oss (sliding and full layers, attention
sinks, a mixture of experts): greedy outputs equal mlx-lm's own generate (RotatingKVCache)
token for token, with prompts longer than the window, staggered arrivals, chunked prefill,
forced preemption, prefix hits and cascade forced on; every block free afterwards. W = 20 is
not a multiple of the block size."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.engine.config import EngineConfig
from shoal.engine.llm import LLM
from shoal.engine.model_runner import ModelRunner, cache_kinds

from conftest import random_prompts, reference_greedy
from test_batch_invariance import assert_staggered_matches

WINDOW = 20


@pytest.fixture(scope="module", params=["gemma3_text", "gpt_oss"])
def gemma(request, tmp_path_factory: pytest.TempPathFactory):
    from mlx_lm import load

    from shoal.bench.random_model import make_random_model

    root = Path(tmp_path_factory.mktemp("models"))
    if request.param == "gemma3_text":
        path = make_random_model(root / "gemma3", "gemma3_text", hidden_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                 intermediate_size=128, sliding_window=WINDOW, sliding_window_pattern=2)
    else:
        path = make_random_model(root / "gpt-oss", "gpt_oss", hidden_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 intermediate_size=64, sliding_window=WINDOW)
    return load(str(path))


def test_the_model_has_sliding_and_global_layers(gemma):
    model, _ = gemma
    assert cache_kinds(model) == (WINDOW, None, WINDOW, None)


@pytest.mark.parametrize("num_blocks,budget", [(None, 512), (20, 32)], ids=["roomy", "chunked-preempting"])
def test_staggered_batch_matches_mlx_lm_generate(gemma, num_blocks, budget):
    model, tokenizer = gemma
    prompts = random_prompts(16, 1, 90, vocab=256, seed=5)
    max_tokens = [1 + (7 * i) % 30 for i in range(16)]
    assert sum(len(p) > WINDOW for p in prompts) >= 10
    assert_staggered_matches(model, tokenizer, prompts, max_tokens, num_blocks, budget, 256)

def test_shared_prefix_longer_than_the_window_with_cascade_forced(gemma):
    """Rows sharing a 64-token prefix: prefix hits, and cascade on the global layers (the
    sliding layers take the reference path); the same tokens as each prompt alone."""
    model, tokenizer = gemma
    shared = random_prompts(1, 64, 64, vocab=256, seed=8)[0]
    prompts = [shared + q for q in random_prompts(8, 2, 12, vocab=256, seed=9)]
    expected = [reference_greedy(model, p, 10, tokenizer.eos_token_ids) for p in prompts]
    config = EngineConfig(block_size=16, max_model_len=256, attention_backend="cascade")
    llm = LLM(config, ModelRunner.from_model(model, tokenizer, config))
    from shoal.engine.sampling_params import SamplingParams

    assert llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10)) == expected
    assert llm.scheduler.kv.num_cache_hits > 0 and llm.runner.attention.num_cascade_forwards > 0
