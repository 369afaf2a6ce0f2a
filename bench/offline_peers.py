"""The peer side of the offline throughput benchmark: mlx-lm on its own.

Both runners generate exactly ``max_tokens`` greedy tokens for every prompt,
with no stop tokens, so every system in the comparison produces the same
number of tokens. mlx-lm's ``generate_step`` never checks EOS (only
``stream_generate`` does), and ``BatchGenerator`` stops early only on its stop
sequences, which are empty when ``stop_tokens`` is None.
"""

from __future__ import annotations

import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator, generate_step

# Warmup size: enough to touch every weight and the KV-cache paths, small enough to be cheap.
_WARMUP_PROMPT_LEN = 8
_WARMUP_TOKENS = 4


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Return ``n`` prompts of ``length`` token ids drawn uniformly from ``[0, vocab_size)``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(n, length)).tolist()


def _result(tokens: list[list[int]], seconds: float) -> dict[str, Any]:
    """Package per-request tokens and wall time as a throughput record."""
    total = sum(len(t) for t in tokens)
    return {
        "output_tokens": total,
        "seconds": seconds,
        "tok_per_s": total / seconds if seconds > 0 else float("inf"),
        "tokens": tokens,
    }


def _warmup_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """Short prefixes of the real prompts, for an untimed warmup."""
    return [p[:_WARMUP_PROMPT_LEN] for p in prompts]


def _generate_one(model: nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy-generate exactly ``max_tokens`` ids for one prompt with ``generate_step``."""
    # sampler=None means greedy (argmax); generate_step has no EOS check.
    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens)
    return [int(token) for token, _ in steps]


def run_mlx_lm_single(model: nn.Module, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Time mlx-lm serving ``prompts`` one at a time, ``max_tokens`` greedy tokens each."""
    _generate_one(model, _warmup_prompts(prompts)[0], _WARMUP_TOKENS)
    start = time.perf_counter()
    tokens = [_generate_one(model, p, max_tokens) for p in prompts]
    return _result(tokens, time.perf_counter() - start)


def _generate_batch(model: nn.Module, prompts: list[list[int]], max_tokens: int,
                    prefill_batch_size: int | None = None) -> list[list[int]]:
    """Greedy-generate exactly ``max_tokens`` ids per prompt, all prompts in one BatchGenerator
    (prefilled ``prefill_batch_size`` at a time; default: all together)."""
    n = len(prompts)
    # stop_tokens=None gives an empty stop automaton, so only max_tokens ends a sequence.
    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=None,
        completion_batch_size=n,
        prefill_batch_size=min(n, prefill_batch_size or n),
    )
    try:
        uids = gen.insert(prompts, max_tokens=[max_tokens] * n)
        out: dict[int, list[int]] = {uid: [] for uid in uids}
        remaining = n
        # next_generated() returns [] once nothing is queued, so count finishes instead.
        while remaining:
            for r in gen.next_generated():
                out[r.uid].append(int(r.token))
                remaining -= r.finish_reason is not None
        return [out[uid] for uid in uids]
    finally:
        gen.close()


def run_mlx_lm_batch(model: nn.Module, prompts: list[list[int]], max_tokens: int,
                     prefill_batch_size: int | None = None) -> dict[str, Any]:
    """Time mlx-lm's ``BatchGenerator`` decoding all ``prompts`` together, ``max_tokens`` each."""
    _generate_batch(model, _warmup_prompts(prompts), _WARMUP_TOKENS, prefill_batch_size)
    start = time.perf_counter()
    tokens = _generate_batch(model, prompts, max_tokens, prefill_batch_size)
    return _result(tokens, time.perf_counter() - start)
