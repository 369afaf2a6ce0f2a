"""Per-row sampling in one batched op: every row keeps its own temperature, filters,
penalties and seed, so a greedy row is exact beside a sampling one.

Host-side work (penalty counts, noise from per-request generators) is numpy; the heavy ops
(argmax, softmax, sort for top-k/top-p) run once on the whole (rows, vocab) batch, and only
when some row needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from shoal.engine.outputs import ScheduledRequest, TokenLogprobs


@dataclass(frozen=True)
class SamplingBatch:
    """Host arrays for the rows that sample this step."""

    temperature: np.ndarray  # (R,) 0 = greedy
    top_k: np.ndarray  # (R,) 0 = off
    top_p: np.ndarray
    min_p: np.ndarray
    bias: np.ndarray | None  # (R, V) additive: logit_bias, banned ids
    penalties: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # counts, (R, 3) knobs, seen mask
    noise: np.ndarray | None  # (R, V) Gumbel noise for non-greedy rows (0 for greedy rows)
    num_top_logprobs: int | None  # max top_logprobs over rows; None when no row wants logprobs
    wants_logprobs: tuple[bool, ...]


@dataclass(frozen=True)
class SamplerOutput:
    """One token per row, and its logprobs for the rows that asked (None if none did)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None


LOGIT_LIMIT = 1e30  # penalized logits are clipped to +-this, so every logprob stays finite
LOWEST_LOGPROB = -9999.0  # what OpenAI reports for a token with no probability at all


def finite_logprob(value: float) -> float:
    return value if value >= LOWEST_LOGPROB else LOWEST_LOGPROB  # also maps NaN and -inf


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self._rng = np.random.default_rng(seed)
        self._request_rngs: dict[str, np.random.Generator] = {}

    def forget(self, request_ids: tuple[str, ...]) -> None:
        for request_id in request_ids:
            self._request_rngs.pop(request_id, None)

    def __call__(self, logits: mx.array, rows: list[ScheduledRequest],
                 processor_bias: np.ndarray | None = None) -> SamplerOutput:
        """Sample every row of `logits` (R, V); `processor_bias` is the rows' logits-processor
        mask (engine/logits_process.step_bias), added with logit_bias before anything else."""
        batch = self.prepare(rows, processor_bias)
        tokens, chosen, top = self.sample(logits, batch)
        mx.eval([a for a in (tokens, chosen, top) if a is not None])
        token_ids = np.array(tokens)
        if chosen is None:
            return SamplerOutput(token_ids.tolist())
        top_np = (np.array(top[0]), np.array(top[1])) if top is not None else None
        return SamplerOutput(token_ids.tolist(), to_logprobs(token_ids, np.array(chosen), top_np, batch, rows))

    def prepare(self, rows: list[ScheduledRequest], processor_bias: np.ndarray | None = None) -> SamplingBatch:
        params = [r.params for r in rows]
        num_logprobs = max((p.top_logprobs for p in params if p.logprobs), default=None)
        return SamplingBatch(
            temperature=np.array([p.temperature for p in params], dtype=np.float32),
            top_k=np.array([min(p.top_k, self.vocab_size) for p in params], dtype=np.int32),
            top_p=np.array([p.top_p for p in params], dtype=np.float32),
            min_p=np.array([p.min_p for p in params], dtype=np.float32),
            bias=self._bias(rows, processor_bias),
            penalties=self._penalties(rows),
            noise=self._noise(rows),
            num_top_logprobs=num_logprobs,
            wants_logprobs=tuple(p.logprobs for p in params),
        )

    def _bias(self, rows: list[ScheduledRequest], processor_bias: np.ndarray | None) -> np.ndarray | None:
        if not any(r.params.logit_bias for r in rows):
            return processor_bias
        bias = np.zeros((len(rows), self.vocab_size), dtype=np.float32) if processor_bias is None else processor_bias
        for i, r in enumerate(rows):
            for token, value in r.params.logit_bias:
                if 0 <= token < self.vocab_size:
                    bias[i, token] += value
        return bias

    def _penalties(self, rows: list[ScheduledRequest]):
        if not any(r.history is not None for r in rows):
            return None
        counts = np.zeros((len(rows), self.vocab_size), dtype=np.float32)
        seen = np.zeros((len(rows), self.vocab_size), dtype=bool)
        knobs = np.zeros((len(rows), 3), dtype=np.float32)
        knobs[:, 0] = 1.0
        for i, r in enumerate(rows):
            if r.history is None:
                continue
            history = np.asarray(r.history, dtype=np.int64)
            seen[i, history] = True  # repetition penalty: prompt and output (HF semantics)
            counts[i] = np.bincount(history[r.num_prompt_tokens:], minlength=self.vocab_size)[:self.vocab_size]
            p = r.params
            knobs[i] = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        return counts, knobs, seen

    def _noise(self, rows: list[ScheduledRequest]) -> np.ndarray | None:
        if all(r.params.greedy for r in rows):
            return None
        noise = np.zeros((len(rows), self.vocab_size), dtype=np.float32)
        for i, r in enumerate(rows):
            if not r.params.greedy:
                noise[i] = self._generator(r).gumbel(size=self.vocab_size)
        return noise

    def _generator(self, row: ScheduledRequest) -> np.random.Generator:
        if row.params.seed is None:
            return self._rng
        rng = self._request_rngs.get(row.request_id)
        if rng is None:
            rng = self._request_rngs[row.request_id] = np.random.default_rng(row.params.seed)
        return rng

    def sample(self, logits: mx.array, batch: SamplingBatch) -> tuple[mx.array, mx.array | None, mx.array | None]:
        """Returns (tokens, chosen logprobs, (top ids, top logprobs)) as lazy MLX arrays."""
        if logits.dtype != mx.float32:
            logits = logits.astype(mx.float32)
        if batch.penalties is not None:
            logits = apply_penalties(logits, *map(mx.array, batch.penalties))
        if batch.bias is not None:
            bias = mx.array(batch.bias)  # a masked token stays -inf whatever its logit (even +inf)
            logits = mx.where(bias == -mx.inf, -mx.inf, logits + bias)
        tokens = mx.argmax(logits, axis=-1)
        if batch.noise is not None:
            tokens = mx.where(mx.array(batch.temperature == 0), tokens, self._sample(logits, batch))
        if batch.num_top_logprobs is None:
            return tokens, None, None
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        top = None
        if batch.num_top_logprobs > 0:
            k = batch.num_top_logprobs
            top_ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
            top = (top_ids, mx.take_along_axis(logprobs, top_ids, axis=-1))
        return tokens, chosen, top

    def _sample(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        temperature = np.where(batch.temperature > 0, batch.temperature, 1.0)
        scaled = logits / mx.array(temperature)[:, None]
        if (batch.top_k > 0).any() or (batch.top_p < 1).any() or (batch.min_p > 0).any():
            scaled = apply_filters(scaled, batch.top_k, batch.top_p, batch.min_p)
        # Gumbel-max: argmax(logits / T + G) is a draw from softmax(logits / T).
        return mx.argmax(scaled + mx.array(batch.noise), axis=-1)


def apply_penalties(logits: mx.array, counts: mx.array, knobs: mx.array, seen: mx.array) -> mx.array:
    """Repetition (divide positive / multiply negative logits of seen tokens), then
    presence and frequency penalties over generated tokens (OpenAI semantics)."""
    rep = knobs[:, 0:1]
    penalized = mx.where(logits > 0, logits / rep, logits * rep)
    logits = mx.where(seen, penalized, logits)
    logits = logits - knobs[:, 1:2] * (counts > 0) - knobs[:, 2:3] * counts
    # A tiny or huge penalty overflows float32; an infinite logit would make logprobs NaN.
    return mx.clip(logits, -LOGIT_LIMIT, LOGIT_LIMIT)


def apply_filters(scaled: mx.array, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray) -> mx.array:
    """Mask everything outside each row's top-k, top-p nucleus and min-p floor."""
    vocab = scaled.shape[-1]
    probs = mx.softmax(scaled, axis=-1)
    order = mx.argsort(-scaled, axis=-1)
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    exclusive_cum = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    k = mx.array(np.where(top_k > 0, top_k, vocab))
    keep_sorted = (exclusive_cum < mx.array(top_p)[:, None]) & (mx.arange(vocab)[None, :] < k[:, None])
    keep_sorted = keep_sorted & (sorted_probs >= mx.array(min_p)[:, None] * sorted_probs[:, :1])
    keep = mx.put_along_axis(mx.zeros(scaled.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, scaled, -mx.inf)


def to_logprobs(tokens: np.ndarray, chosen: np.ndarray | None, top: tuple[np.ndarray, np.ndarray] | None,
                batch: SamplingBatch, rows: list[ScheduledRequest]) -> list[TokenLogprobs | None]:
    """Host-side logprob records for the rows that asked for them."""
    out: list[TokenLogprobs | None] = []
    for i, row in enumerate(rows):
        if chosen is None or not batch.wants_logprobs[i]:
            out.append(None)
            continue
        n = row.params.top_logprobs
        pairs = ()
        if n and top is not None:
            ranked = sorted(zip(top[0][i].tolist(), top[1][i].tolist()), key=lambda p: -p[1])[:n]
            pairs = tuple((int(t), finite_logprob(float(lp))) for t, lp in ranked)
        out.append(TokenLogprobs(int(tokens[i]), finite_logprob(float(chosen[i])), pairs))
    return out
