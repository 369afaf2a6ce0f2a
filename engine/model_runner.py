"""The only owner of MLX state: weights, KV pools, the forward pass, sampling.

Every method runs on one thread (the engine's MLX thread): MLX streams are thread-local and
a graph built on one thread cannot be evaluated on another.

A forward runs over an (R, L) token array: R scheduled requests, each padded on the right
to L, its longest query; indices for every layer's pool write, gather and mask are built
once per forward in numpy. Decode-only steps are one (R, 1) forward. A step that mixes
prompt chunks of very different lengths is split into a few forwards (see `plan_forwards`)
so padding never costs more than a quarter of the real work; all of them are evaluated as
one graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from shoal.engine.config import EngineConfig
from shoal.engine.loader import load_model
from shoal.engine.outputs import ModelRunnerOutput, SchedulerOutput, ScheduledRequest
from shoal.engine.attention import AttentionSelector
from shoal.engine.paged_cache import PagedKVCache, install_attention
from shoal.engine.logits_process import step_bias
from shoal.engine.sampler import Sampler

log = logging.getLogger("shoal")


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: mx.Dtype
    vocab_size: int  # logits width, which can differ from the tokenizer's size
    windows: tuple[int | None, ...] = ()  # per layer: None = full attention, W = sliding window

    def bytes_per_block(self, block_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * block_size * self.dtype.size


@dataclass(frozen=True)
class ModelInfo:
    """What loading discovered: returned to the engine, never written into the config."""

    path: str
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    num_blocks: int  # including the null block
    block_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    kv_cache_bytes: int


class _ProbeCache:
    """Records the K/V shape each layer produces for one token."""

    offset = 0

    def __init__(self):
        self.shape: tuple[int, ...] | None = None
        self.dtype = None

    def make_mask(self, N: int, **kwargs):
        return None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.shape, self.dtype = keys.shape, keys.dtype
        return keys, values


def probe_kv_layout(model) -> KVLayout:
    """Run one token through the model to learn its per-layer KV shape, whatever the
    architecture calls its heads."""
    windows = layer_windows(model)
    probes = [_ProbeCache() for _ in model.layers]
    logits = model(mx.array([[0]]), cache=probes)
    mx.eval(logits)
    shapes = {p.shape for p in probes}
    if len(shapes) != 1 or None in shapes:
        raise ValueError(f"layers disagree on KV shape: {shapes}")
    _, num_kv_heads, _, head_dim = probes[0].shape
    return KVLayout(len(probes), num_kv_heads, head_dim, probes[0].dtype, logits.shape[-1],
                    windows or (None,) * len(probes))


def layer_windows(model) -> tuple[int | None, ...] | None:
    """Each layer's attention window from the model's own `make_cache()`: None for a plain
    KVCache (full attention), W for a RotatingKVCache(max_size=W) (sliding window: paged like
    the others, the mask covers the last W tokens). Anything else is refused."""
    if not hasattr(model, "make_cache"):
        return None
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    caches = model.make_cache()
    if len(caches) != len(model.layers):
        raise ValueError(f"{type(model).__module__}: not every layer has a KV cache (SSM or hybrid layers "
                         "are not supported yet)")
    windows = []
    for cache in caches:
        if type(cache) is KVCache:
            windows.append(None)
        elif type(cache) is RotatingKVCache and cache.keep == 0:
            windows.append(cache.max_size)
        else:
            raise ValueError(f"{type(model).__module__}: layer cache {type(cache).__name__} is not supported "
                             "yet (only full attention and sliding windows)")
    return tuple(windows)


# Architectures whose forward is exactly `head(model.model(inputs, cache))`.
_SPLIT_HEAD_MODULES = ("llama", "qwen2", "qwen3", "phi3")


def split_head(model):
    """(backbone, head) for models we can run head-less, so a prefill computes logits only
    at the positions it samples (the head is ~20% of a small model's prefill FLOPs);
    None for other architectures, which run whole."""
    if type(model).__module__.rsplit(".", 1)[-1] not in _SPLIT_HEAD_MODULES:
        return None
    if model.args.tie_word_embeddings:
        return model.model, model.model.embed_tokens.as_linear
    return model.model, model.lm_head


MAX_PADDING = 0.25  # padded tokens allowed per real token in one forward


def plan_forwards(lengths: list[int]) -> list[list[int]]:
    """Group row indices into forwards. Prompt chunks (length > 1) keep schedule order, so a
    request that hit prefix blocks first computed in this same step always runs after (or
    with) the request computing them: within a forward every layer writes before it reads.
    Single-token rows, decodes or a prompt whose prefix is all cached, go last, together."""
    groups: list[list[int]] = []
    current: list[int] = []
    real = longest = 0
    for i, n in enumerate(lengths):
        if n == 1:
            continue
        if current and (len(current) + 1) * max(longest, n) > (real + n) * (1 + MAX_PADDING):
            groups.append(current)
            current, real, longest = [], 0, 0
        current.append(i)
        real, longest = real + n, max(longest, n)
    if current:
        groups.append(current)
    singles = [i for i, n in enumerate(lengths) if n == 1]
    return groups + [singles] if singles else groups


def _max_position(model) -> int | None:
    args = getattr(model, "args", None)
    return getattr(args, "max_position_embeddings", None)


class ModelRunner:
    def __init__(self, model, tokenizer, info: ModelInfo, layout: KVLayout, seed: int,
                 attention_backend: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        num_slots = info.num_blocks * info.block_size
        self.num_slots = num_slots
        self.caches = [
            PagedKVCache(mx.zeros((layout.num_kv_heads * num_slots, layout.head_dim), layout.dtype),
                         mx.zeros((layout.num_kv_heads * num_slots, layout.head_dim), layout.dtype),
                         layout.num_kv_heads, window)
            for window in layout.windows
        ]
        mx.eval([c.state for c in self.caches])
        self.sampler = Sampler(info.vocab_size, seed)
        self._split = split_head(model)
        self.attention = AttentionSelector(attention_backend, info.block_size, num_slots, layout.num_kv_heads)
        install_attention(model)

    @classmethod
    def load(cls, config: EngineConfig) -> ModelRunner:
        model, tokenizer, path = load_model(config.model, config.dtype)
        return cls.from_model(model, tokenizer, config, str(path))

    @classmethod
    def from_model(cls, model, tokenizer, config: EngineConfig, path: str = "") -> ModelRunner:
        layout = probe_kv_layout(model)
        per_block = layout.bytes_per_block(config.block_size)
        num_blocks = config.num_blocks or max(2, config.kv_cache_bytes // per_block)
        wanted_len = config.max_model_len or _max_position(model)
        if config.num_blocks is None and wanted_len:
            # No more than max_num_seqs full-length sequences can use: small models would
            # otherwise allocate (and zero) gigabytes they never touch.
            num_blocks = min(num_blocks, config.max_num_seqs * -(-wanted_len // config.block_size) + 1)
        capacity = (num_blocks - 1) * config.block_size
        max_model_len = config.max_model_len or min(wanted_len or capacity, capacity)
        info = ModelInfo(
            path=path, vocab_size=layout.vocab_size, num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
            dtype=str(layout.dtype).removeprefix("mlx.core."), num_blocks=num_blocks,
            block_size=config.block_size, max_model_len=max_model_len,
            eos_token_ids=frozenset(tokenizer.eos_token_ids), kv_cache_bytes=num_blocks * per_block)
        return cls(model, tokenizer, info, layout, config.seed, config.attention_backend)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """One forward over every scheduled request, then one batched sample."""
        self.sampler.forget(sched.finished_request_ids)
        rows = sched.scheduled
        if not rows:
            return ModelRunnerOutput(())
        logits = self._forward(rows)
        sample_idx = [i for i, r in enumerate(rows) if r.sample]
        pools = [c.state for c in self.caches]
        if not sample_idx:
            mx.eval(pools)
            return ModelRunnerOutput((None,) * len(rows))
        sample_rows = [rows[i] for i in sample_idx]
        if len(sample_idx) < len(rows):  # decode steps sample every row: no copy then
            logits = logits[mx.array(sample_idx)]
        mx.async_eval(logits, pools)  # the forward runs while the processors fill their masks
        bias, errors = step_bias(sample_rows, self.info.vocab_size)
        out = self.sampler(logits, sample_rows, bias)
        logprobs = None if out.logprobs is None else self._align(rows, sample_idx, out.logprobs)
        return ModelRunnerOutput(self._align(rows, sample_idx, out.token_ids), logprobs,
                                 tuple((sample_rows[i].request_id, why) for i, why in errors.items()))

    def _forward(self, rows: tuple[ScheduledRequest, ...]) -> mx.array:
        """Logits (R, V) at each row's last scheduled token, in row order."""
        groups = plan_forwards([len(r.token_ids) for r in rows])
        if len(groups) == 1:
            return self._forward_group(rows)
        parts = []
        for group in groups:
            parts.append(self._forward_group([rows[i] for i in group]))
            # Finish this forward before the next one writes the pools: a later scatter that
            # runs while an earlier gather still reads a pool cannot reuse its buffer, and MLX
            # then copies the whole pool (measured: seconds per step).
            mx.eval(parts[-1], [c.state for c in self.caches])
        order = np.argsort(np.concatenate(groups))
        return mx.concatenate(parts)[mx.array(order)]

    def _forward_group(self, rows) -> mx.array:
        lengths = [len(r.token_ids) for r in rows]
        tokens = np.zeros((len(rows), max(lengths)), dtype=np.int32)
        for i, r in enumerate(rows):
            tokens[i, :lengths[i]] = r.token_ids
        ctx = self.attention.step_context([r.block_ids for r in rows], [r.start_pos for r in rows], lengths)
        for cache in self.caches:
            cache.ctx = ctx
        last = (mx.arange(len(rows)), mx.array(lengths) - 1)
        if self._split is None:
            return self.model(mx.array(tokens), cache=self.caches)[last]
        backbone, head = self._split
        return head(backbone(mx.array(tokens), cache=self.caches)[last])

    @staticmethod
    def _align(rows, sample_idx: list[int], values: list) -> tuple:
        out = [None] * len(rows)
        for i, value in zip(sample_idx, values):
            out[i] = value
        return tuple(out)

    def close(self) -> None:
        """Finish pending MLX work; required before the MLX thread ends."""
        mx.synchronize()
        mx.clear_streams()
