"""Shared fixtures. Tests run on MLX's own (reference) BLAS: there a row of a batched
float32 matmul is bit-identical to the same row computed alone, so batch invariance is
exact. (OpenBLAS switches kernels for single-row matmuls; serving preloads it for speed.)"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    from shoal.bench.random_model import make_random_model

    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_random_model(root / "llama", "llama", hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
        "qwen3": make_random_model(root / "qwen3", "qwen3", hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                   intermediate_size=128),
        "qwen2": make_random_model(root / "qwen2", "qwen2", hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
        "mistral": make_random_model(root / "mistral", "mistral", hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                     seed=3, tie_word_embeddings=False),
    }


@pytest.fixture(scope="session")
def hybrid_families(tmp_path_factory) -> dict:
    """(model, tokenizer) of tiny random models with recurrent layers (and qwen3_moe), by family."""
    from mlx_lm import load

    from shoal.bench.random_model import make_random_model

    root = tmp_path_factory.mktemp("hybrid-models")
    return {f: load(str(make_random_model(root / f, f, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, intermediate_size=64)))
            for f in ("qwen3_5", "qwen3_next", "lfm2", "nemotron_h", "qwen3_moe")}


@pytest.fixture(scope="session")
def loaded(model_dirs):
    """(model, tokenizer) per family, loaded once."""
    from mlx_lm import load

    return {name: load(str(path)) for name, path in model_dirs.items()}


def reference_greedy(model, prompt: list[int], max_tokens: int, eos: set[int] = frozenset()) -> list[int]:
    """mlx-lm's own generate_step, greedy, for one prompt alone."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out: list[int] = []
    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, axis=-1))
    for token, _ in steps:
        out.append(int(token))
        if int(token) in eos:
            break
    return out


def random_prompts(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(low, high + 1))).tolist() for _ in range(n)]


def fake_tokenizer(eos: tuple[int, ...] = ()):
    return types.SimpleNamespace(eos_token_ids=set(eos))
