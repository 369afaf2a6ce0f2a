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
from shoal.engine.paged_cache import PagedKVCache, PagedStateCache, install_attention
from shoal.engine.logits_process import step_bias
from shoal.engine.sampler import Sampler

log = logging.getLogger("shoal")


@dataclass(frozen=True)
class StateSpec:
    """A recurrent layer's per-request state (Gated DeltaNet, Mamba, short convolution): the
    arrays its mlx-lm `ArraysCache` holds after a token, without the batch axis."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[mx.Dtype, ...]

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * d.size for s, d in zip(self.shapes, self.dtypes))


# One entry of a model's cache list: None = full attention, an int W = sliding window of W
# tokens (both paged), a StateSpec = recurrent state (one slot per running request).
CacheKind = int | StateSpec | None


@dataclass(frozen=True)
class KVLayout:
    kinds: tuple[CacheKind, ...]  # per entry of the model's cache list, in its order
    num_kv_heads: int
    head_dim: int
    dtype: mx.Dtype
    vocab_size: int  # logits width, which can differ from the tokenizer's size

    @property
    def num_layers(self) -> int:
        """Layers with paged K/V."""
        return sum(not isinstance(k, StateSpec) for k in self.kinds)

    @property
    def state_bytes(self) -> int:
        """One request's recurrent state, all layers."""
        return sum(k.nbytes for k in self.kinds if isinstance(k, StateSpec))

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
    kv_cache_bytes: int  # paged K/V plus recurrent state slots
    num_state_slots: int = 0  # recurrent models: one per request that may run at once
    state_bytes: int = 0  # of kv_cache_bytes, the state slots'
    num_state_snapshots: int = 0  # recurrent models: states kept at block boundaries (prefix caching)
    snapshot_bytes: int = 0  # of kv_cache_bytes, the snapshots'
    tensor_parallel_size: int = 1  # ranks sharing each layer: KV heads, pool bytes are per rank
    pipeline_parallel_size: int = 1  # ranks holding a run of layers each: layers are per rank

    @property
    def has_state(self) -> bool:
        return self.num_state_slots > 0


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
        self.keys = keys  # what a pipelined model ties its send to
        return keys, values


def probe_kv_layout(model) -> KVLayout:
    """Run one token through the model, with its own cache list, to learn each entry's kind,
    the K/V shape of its attention layers (whatever the architecture calls its heads) and
    the state its recurrent layers keep."""
    kinds = cache_kinds(model)
    own = model.make_cache() if hasattr(model, "make_cache") else [None] * len(kinds)
    probes = [cache if kind == "state" else _ProbeCache() for kind, cache in zip(kinds, own)]
    logits = model(mx.array([[0]]), cache=probes)
    mx.eval(logits, [p.cache for p in probes if not isinstance(p, _ProbeCache)])
    shapes = {p.shape for p in probes if isinstance(p, _ProbeCache)}
    if not shapes:
        raise ValueError(f"{type(model).__module__}: no attention layer (on this pipeline rank)")
    if len(shapes) != 1 or None in shapes:
        raise ValueError(f"layers disagree on KV shape: {shapes}")
    first = next(p for p in probes if isinstance(p, _ProbeCache))
    _, num_kv_heads, _, head_dim = first.shape
    resolved = []
    for kind, probe in zip(kinds, probes):
        if kind == "state":
            if any(a is None for a in probe.cache):
                raise ValueError(f"{type(model).__module__}: a recurrent layer left part of its state unset")
            kind = StateSpec(tuple(a.shape[1:] for a in probe.cache), tuple(a.dtype for a in probe.cache))
        resolved.append(kind)
    return KVLayout(tuple(resolved), num_kv_heads, head_dim, first.dtype, logits.shape[-1])


def cache_kinds(model) -> tuple[int | str | None, ...]:
    """Each entry of the model's own `make_cache()`: None for a plain KVCache (full
    attention), W for a RotatingKVCache(max_size=W) (sliding window: paged like the others,
    the mask covers the last W tokens), "state" for an ArraysCache (a recurrent layer).
    A model without `make_cache` has one full-attention entry per layer. Anything else is
    refused."""
    if not hasattr(model, "make_cache"):
        return (None,) * len(model.layers)
    from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

    kinds = []
    for cache in model.make_cache():
        if type(cache) is KVCache:
            kinds.append(None)
        elif type(cache) is RotatingKVCache and cache.keep == 0:
            kinds.append(cache.max_size)
        elif type(cache) is ArraysCache:
            kinds.append("state")
        else:
            raise ValueError(f"{type(model).__module__}: layer cache {type(cache).__name__} is not supported "
                             "(only full attention, sliding windows and recurrent state)")
    return tuple(kinds)


# Architectures whose forward is `head(backbone(inputs, cache))`, with where the backbone is.
_BACKBONES = {"llama": "model", "qwen2": "model", "qwen3": "model", "phi3": "model", "qwen3_moe": "model",
              "gemma3_text": "model", "gpt_oss": "model", "lfm2": "model", "qwen3_next": "model",
              "qwen3_5": "language_model.model", "nemotron_h": "backbone"}


class LastPositions:
    """Makes the model's backbone return only the positions a forward samples, so the
    model's own head runs on R rows instead of R x L (it is ~20% of a small model's prefill
    FLOPs, and MLX would compute every position's logits before slicing them). Only while
    `index` is set: the same model object still runs whole everywhere else."""

    def __init__(self, backbone):
        self.index: tuple[mx.array, mx.array] | None = None
        base, holder = type(backbone), self

        def call(module, *args, **kwargs):
            h = base.__call__(module, *args, **kwargs)
            return h if holder.index is None else h[holder.index][:, None]

        backbone.__class__ = type(base.__name__, (base,), {"__call__": call, "__module__": base.__module__,
                                                           "last_positions": self})

    @classmethod
    def install(cls, model) -> LastPositions | None:
        """None for architectures not known to be head-on-backbone: they run whole."""
        path = _BACKBONES.get(type(model).__module__.rsplit(".", 1)[-1])
        if path is None:
            return None
        backbone = model
        for name in path.split("."):
            backbone = getattr(backbone, name)
        return getattr(type(backbone), "last_positions", None) or cls(backbone)  # once per model


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


def plan_unpadded(lengths: list[int], fresh: list[bool]) -> list[list[int]]:
    """Forwards for a model with recurrent layers: a padded position would advance a row's
    state, so rows of one forward have the same length (decodes all run together), and
    either all start fresh (their state reads as None, as in a new ArraysCache) or none."""
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, key in enumerate(zip(lengths, fresh)):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


SNAPSHOT_SHARE = 0.25  # of the KV memory left after the state slots, by default


def num_state_snapshots(config: EngineConfig, state_bytes: int, slots_bytes: int, per_block: int) -> int:
    """How many recurrent-state snapshots prefix caching keeps: `num_state_snapshots` if set,
    else a quarter of the KV memory the state slots leave (with `num_blocks` forced, as tests
    do, two per running request); 0 without recurrent layers or prefix caching."""
    if not state_bytes or not config.enable_prefix_caching:
        return 0
    if config.num_state_snapshots is not None:
        wanted = config.num_state_snapshots
        if config.num_blocks is None and config.kv_cache_bytes < slots_bytes + wanted * state_bytes + 2 * per_block:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} cannot hold {wanted} state snapshots of "
                             f"{state_bytes} bytes beside the state slots and two KV blocks: raise the KV "
                             "memory or lower --num-state-snapshots")
        return wanted
    if config.num_blocks is not None:
        return 2 * config.max_num_seqs
    return int((config.kv_cache_bytes - slots_bytes) * SNAPSHOT_SHARE) // state_bytes


def _spans(rows) -> np.ndarray:
    """Where each row's sampled positions start among all of them (its last position, and one
    more per draft), with the total last."""
    return np.cumsum([0] + [1 + r.num_draft_tokens for r in rows])


def verify(row: ScheduledRequest, sampled: list[int]) -> int | tuple[int, ...]:
    """A row's token, or for a row with drafts the drafts its own samples agree with, then
    its sample at the first disagreement (or after the last draft). Drafts are deterministic,
    so accepting draft d where the target drew d is exact rejection sampling: each emitted
    token is a draw from the target's distribution given the tokens before it."""
    k = row.num_draft_tokens
    if not k:
        return sampled[0]
    drafts = row.token_ids[-k:]
    accepted = 0
    while accepted < k and sampled[accepted] == drafts[accepted]:
        accepted += 1
    return tuple(sampled[:accepted + 1])


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
        self.caches = [self._make_cache(kind, layout, num_slots) for kind in layout.kinds]
        self.kv_caches = [c for c in self.caches if isinstance(c, PagedKVCache)]
        self.state_caches = [c for c in self.caches if isinstance(c, PagedStateCache)]
        mx.eval([c.state for c in self.caches])
        self.sampler = Sampler(info.vocab_size, seed)
        self._last = LastPositions.install(model)
        self.attention = AttentionSelector(attention_backend, info.block_size, num_slots, layout.num_kv_heads)
        self._takes: list[tuple[int, int]] = []  # (state slot, snapshot) to copy once the step commits
        install_attention(model)

    def _make_cache(self, kind: CacheKind, layout: KVLayout, num_slots: int):
        if isinstance(kind, StateSpec):
            def pool(n: int) -> list[mx.array]:
                return [mx.zeros((n, *shape), dtype) for shape, dtype in zip(kind.shapes, kind.dtypes)]
            snapshots = self.info.num_state_snapshots
            return PagedStateCache(pool(self.info.num_state_slots), pool(snapshots) if snapshots else None)
        shape = (layout.num_kv_heads * num_slots, layout.head_dim)
        return PagedKVCache(mx.zeros(shape, layout.dtype), mx.zeros(shape, layout.dtype), layout.num_kv_heads, kind)

    @classmethod
    def load(cls, config: EngineConfig) -> ModelRunner:
        model, tokenizer, path = load_model(config.model, config.dtype)
        return cls.from_model(model, tokenizer, config, str(path))

    @classmethod
    def from_model(cls, model, tokenizer, config: EngineConfig, path: str = "") -> ModelRunner:
        layout = probe_kv_layout(model)
        # Recurrent state: one slot per request that can run at once, and the snapshots that
        # prefix caching keeps, taken from the KV memory before it is cut into blocks.
        num_state_slots = config.max_num_seqs if layout.state_bytes else 0
        state_bytes = num_state_slots * layout.state_bytes
        per_block = layout.bytes_per_block(config.block_size)
        if config.num_blocks is None and config.kv_cache_bytes < state_bytes + 2 * per_block:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} cannot hold the recurrent state of "
                             f"max_num_seqs={config.max_num_seqs} requests ({state_bytes} bytes) and two "
                             "KV blocks: raise the KV memory or lower max_num_seqs")
        num_snapshots = num_state_snapshots(config, layout.state_bytes, state_bytes, per_block)
        snapshot_bytes = num_snapshots * layout.state_bytes
        num_blocks = config.num_blocks or max(2, (config.kv_cache_bytes - state_bytes - snapshot_bytes) // per_block)
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
            eos_token_ids=frozenset(tokenizer.eos_token_ids),
            kv_cache_bytes=num_blocks * per_block + state_bytes + snapshot_bytes,
            num_state_slots=num_state_slots, state_bytes=state_bytes,
            num_state_snapshots=num_snapshots, snapshot_bytes=snapshot_bytes)
        return cls(model, tokenizer, info, layout, config.seed, config.attention_backend)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """One forward over every scheduled request, then one batched sample. Recurrent
        state is written back only once the step succeeded, so a step that raises can be
        rerun (request by request) from the state it started with."""
        self.sampler.forget(sched.finished_request_ids)
        rows = sched.scheduled
        if not rows:
            return ModelRunnerOutput(())
        try:
            out = self._execute(rows)
        except BaseException:
            self.end_step(False)
            raise
        self.end_step(True)
        return out

    def end_step(self, ok: bool) -> None:
        """Commit the recurrent state a step computed, or drop it after a failed step; then
        keep the snapshots the step was asked to take (only if it succeeded)."""
        takes, self._takes = self._takes, []
        for cache in self.state_caches:
            cache.commit() if ok else cache.discard()
            if ok:
                cache.take(takes)

    def _begin_step(self, rows: tuple[ScheduledRequest, ...]) -> None:
        """Restore the snapshots rows start from into their slots; note those to take."""
        if not self.state_caches:
            return
        restores = [(r.state_slot, r.restore_snapshot) for r in rows if r.restore_snapshot is not None]
        self._takes = [(r.state_slot, r.take_snapshot) for r in rows if r.take_snapshot is not None]
        for cache in self.state_caches:
            cache.restore(restores)

    def forward_only(self, rows: tuple[ScheduledRequest, ...]) -> None:
        """A tensor-parallel worker's share of a step: the forward and its all-reduces
        (evaluated to the logits: the last layer's all-reduce feeds them); rank 0 samples."""
        self._begin_step(rows)
        mx.eval(self._forward(rows), self._pending())

    def _execute(self, rows: tuple[ScheduledRequest, ...]) -> ModelRunnerOutput:
        self._begin_step(rows)
        logits = self._forward(rows)  # one row per sampled position: 1 + drafts per row
        sample_idx = [i for i, r in enumerate(rows) if r.sample]
        pending = self._pending()
        if not sample_idx:
            # To the logits even so: a tensor-parallel worker evaluates the same graph, with
            # the same all-reduces (engine/distributed.py).
            mx.eval(logits, pending)
            return ModelRunnerOutput((None,) * len(rows))
        # A row with k drafts samples at each of its last 1 + k positions, as k + 1 rows.
        spans = _spans(rows)
        sample_rows = [rows[i] for i in sample_idx for _ in range(spans[i], spans[i + 1])]
        if len(sample_rows) < spans[-1]:  # decode steps sample every row: no copy then
            logits = logits[mx.array(np.concatenate([np.arange(spans[i], spans[i + 1]) for i in sample_idx]))]
        mx.async_eval(logits, pending)  # the forward runs while the processors fill their masks
        bias, errors = step_bias(sample_rows, self.info.vocab_size)
        out = self.sampler(logits, sample_rows, bias)
        firsts = _spans([rows[i] for i in sample_idx])[:-1]  # each sampling row's first sampled position
        tokens = [verify(rows[i], out.token_ids[f:f + 1 + rows[i].num_draft_tokens]) for i, f in zip(sample_idx, firsts)]
        logprobs = None if out.logprobs is None else self._align(rows, sample_idx, [out.logprobs[f] for f in firsts])
        return ModelRunnerOutput(self._align(rows, sample_idx, tokens), logprobs,
                                 tuple((sample_rows[j].request_id, why) for j, why in errors.items()))

    def _pending(self) -> list:
        """What a forward computed into the pools: K/V (written in place) and new states."""
        return [c.state for c in self.kv_caches] + [c.pending_values() for c in self.state_caches]

    def _forward(self, rows: tuple[ScheduledRequest, ...]) -> mx.array:
        """Logits (R, V) at each row's last scheduled token, in row order."""
        lengths = [len(r.token_ids) for r in rows]
        if self.state_caches:
            groups = plan_unpadded(lengths, [r.start_pos == 0 for r in rows])
        else:
            groups = plan_forwards(lengths)
        if len(groups) == 1:
            return self._forward_group(rows)
        parts = []
        for group in groups:
            parts.append(self._forward_group([rows[i] for i in group]))
            # Finish this forward before the next one writes the pools: a later scatter that
            # runs while an earlier gather still reads a pool cannot reuse its buffer, and MLX
            # then copies the whole pool (measured: seconds per step).
            mx.eval(parts[-1], self._pending())
        # Back to row order, each row's sampled positions together.
        spans = _spans(rows)
        order = np.argsort(np.concatenate([np.arange(spans[i], spans[i + 1]) for g in groups for i in g]))
        return mx.concatenate(parts)[mx.array(order)]

    def _forward_group(self, rows) -> mx.array:
        lengths = [len(r.token_ids) for r in rows]
        tokens = np.zeros((len(rows), max(lengths)), dtype=np.int32)
        for i, r in enumerate(rows):
            tokens[i, :lengths[i]] = r.token_ids
        ctx = self.attention.step_context([r.block_ids for r in rows], [r.start_pos for r in rows], lengths)
        for cache in self.kv_caches:
            cache.ctx = ctx
        if self.state_caches:
            slots = [r.state_slot for r in rows]
            fresh = rows[0].start_pos == 0  # the same for every row of the forward
            for cache in self.state_caches:
                cache.begin(slots, fresh)
        # The last position of each row, or its last 1 + k with k drafts to verify.
        counts = [1 + r.num_draft_tokens for r in rows]
        row_idx = np.repeat(np.arange(len(rows)), counts)
        pos_idx = np.concatenate([np.arange(n - c, n) for n, c in zip(lengths, counts)])
        last = (mx.array(row_idx), mx.array(pos_idx))
        if self._last is None:
            return self.model(mx.array(tokens), cache=self.caches)[last]
        self._last.index = last
        try:
            return self.model(mx.array(tokens), cache=self.caches)[:, 0]
        finally:
            self._last.index = None

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
