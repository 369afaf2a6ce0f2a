"""Attention backends: how one forward's rows attend over the paged KV pool.

The runner picks a backend per forward from the rows' block tables (`AttentionSelector`);
every layer's `PagedKVCache` then writes this forward's K/V and defers to it.

    gather   the reference: each row's whole context gathered from the pool, masked
             attention (folded query heads on CPU, MLX's fused kernel on Metal and CUDA)
    cascade  rows sharing leading physical blocks attend that prefix once, together, then
             each its own suffix, merged exactly (`kernels/cascade.py`)

`--attention-backend auto` (the default) uses cascade only where the cost rule finds a group
of rows sharing at least CASCADE_MIN_PREFIX_TOKENS tokens of blocks whose per-row reads saved,
(rows - 1) x prefix, reach CASCADE_MIN_SAVED_TOKENS; `cascade` uses it wherever two rows share
a block (tests); `gather` never.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from shoal.kernels.cascade import CascadeIndices, build_cascade_indices, cascade_attention, plan_cascade
from shoal.kernels.paged_attention import attention, build_step_indices

ATTENTION_BACKENDS = ("auto", "gather", "cascade")
# Below these a group's prefix pass costs more than the per-row reads it saves. Measured with
# `python -m shoal.bench.cascade attention` (SmolLM2's KV shape, CPU): cascade / gather step
# time is 1.06x at 2 rows x 2k, 1.03x at 8 x 512, 0.83x at 8 x 256, 0.72x at 32 x 256,
# 0.16x at 32 x 2k.
CASCADE_MIN_PREFIX_TOKENS = 256
CASCADE_MIN_SAVED_TOKENS = 4096
CASCADE_MIN_ROWS = 2


@dataclass(frozen=True)
class StepContext:
    """MLX copies of one forward's indices, shared by every layer, and its backend."""

    num_rows: int
    write_rows: mx.array
    gather_blocks: mx.array
    positions: mx.array
    mask: mx.array
    block_size: int
    backend: GatherAttention
    cascade: CascadeIndices | None = None
    query_positions: np.ndarray | None = None  # (R, L) host copy, for window masks
    host_mask: np.ndarray | None = None  # (R, 1, L, S) host copy of `mask`
    tables: np.ndarray | None = None  # (R, B) block tables (host)
    num_blocks: int = 0  # pool blocks, for gather indices
    num_kv_heads: int = 0
    _windows: dict = field(default_factory=dict)

    def window_mask(self, window: int) -> mx.array:
        """`mask` limited to the last `window` positions up to each query (it included),
        mlx-lm's sliding-window semantics, over the full gather (a model that asks for a
        window on a full-attention cache); built once per forward and window."""
        key = ("mask", window)
        if key not in self._windows:
            keys = np.arange(self.host_mask.shape[-1])[None, None, None, :]
            inside = keys > (self.query_positions - window)[:, None, :, None]
            self._windows[key] = mx.array(self.host_mask & inside)
        return self._windows[key]

    def window_view(self, window: int) -> WindowView:
        """What a sliding-window layer reads: per row only the blocks that hold one of its
        queries' last `window` positions, and the mask over them; built once per forward."""
        view = self._windows.get(window)
        if view is None:
            view = self._windows[window] = window_view(self, window)
        return view


@dataclass(frozen=True)
class WindowView:
    gather_blocks: mx.array  # (R * Hkv * Bw,) like StepContext.gather_blocks, fewer blocks
    mask: mx.array  # (R, 1, L, Bw * block_size)


def window_view(ctx: StepContext, window: int) -> WindowView:
    bs, q, tables = ctx.block_size, ctx.query_positions, ctx.tables
    rows, num_table = tables.shape
    first = np.maximum(0, (q[:, 0] - window + 1) // bs)  # first block any query of the row sees
    width = int((num_table - first).max())
    idx = first[:, None] + np.arange(width)[None, :]  # (R, Bw) block index within each table
    inside = idx < num_table
    blocks = np.where(inside, tables[np.arange(rows)[:, None], np.minimum(idx, num_table - 1)], 0)
    pos = (idx[:, :, None] * bs + np.arange(bs)[None, None, :]).reshape(rows, -1)  # (R, Bw * bs)
    qq = q[:, None, :, None]
    mask = (pos[:, None, None, :] <= qq) & (pos[:, None, None, :] > qq - window)
    heads = np.arange(ctx.num_kv_heads)[None, :, None]
    gather = (heads * ctx.num_blocks + blocks[:, None, :]).reshape(-1).astype(np.int32)
    return WindowView(mx.array(gather), mx.array(mask))


class GatherAttention:
    """The reference: attend over each row's whole gathered context."""

    name = "gather"

    def attend(self, ctx: StepContext, cache, queries, keys, values, scale, mask, fused):
        if cache.window is not None:
            mask = ctx.window_view(cache.window).mask  # whatever mask the model passed this layer
        if mx.default_device() == mx.cpu:
            return attention(queries, keys, values, scale, mask)
        return fused(queries, keys, values, cache=None, scale=scale, mask=mask)


class CascadeAttention(GatherAttention):
    """Shared prefixes once per group, suffixes per row. `keys`/`values` (the full gather)
    go unused, so MLX never computes them."""

    name = "cascade"

    def attend(self, ctx: StepContext, cache, queries, keys, values, scale, mask, fused):
        if cache.window is not None:  # a window cuts into the shared prefix: the reference path
            return GATHER.attend(ctx, cache, queries, keys, values, scale, mask, fused)
        return cascade_attention(queries, cache.k_pool, cache.v_pool, ctx.cascade, scale,
                                 cache.num_kv_heads, ctx.block_size)


GATHER, CASCADE = GatherAttention(), CascadeAttention()


class AttentionSelector:
    """Builds each forward's StepContext and picks its backend."""

    def __init__(self, mode: str, block_size: int, num_slots: int, num_kv_heads: int):
        self.block_size = block_size
        self.num_slots = num_slots
        self.num_kv_heads = num_kv_heads
        self.set_mode(mode)
        self.num_cascade_forwards = 0  # forwards that ran cascade, for tests and benchmarks
        self.num_prefix_tokens_shared = 0  # per-row prefix reads saved, summed over forwards

    def set_mode(self, mode: str) -> None:
        if mode not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {mode!r}")
        self.mode = mode
        forced = mode == "cascade"
        self.min_blocks = 1 if forced else -(-CASCADE_MIN_PREFIX_TOKENS // self.block_size)
        self.min_saved = 1 if forced else -(-CASCADE_MIN_SAVED_TOKENS // self.block_size)

    def step_context(self, block_tables: list[tuple[int, ...]], starts: list[int],
                     lengths: list[int]) -> StepContext:
        bs = self.block_size
        idx = build_step_indices(block_tables, starts, lengths, bs, self.num_slots, self.num_kv_heads)
        groups = []
        if self.mode != "gather":
            # A prefix must lie wholly before the row's first query token.
            limits = np.minimum(np.asarray(starts) // bs, [len(t) for t in block_tables])
            groups = plan_cascade(idx.tables, limits, self.min_blocks, CASCADE_MIN_ROWS, self.min_saved)
        cascade = None
        if groups:
            cascade = build_cascade_indices(idx.tables, np.asarray(starts, dtype=np.int64),
                                            np.asarray(lengths, dtype=np.int64), groups, bs,
                                            self.num_slots // bs, self.num_kv_heads)
            self.num_cascade_forwards += 1
            self.num_prefix_tokens_shared += sum((len(rows) - 1) * n * bs for rows, n in groups)
        return StepContext(
            num_rows=len(starts), write_rows=mx.array(idx.write_rows),
            gather_blocks=mx.array(idx.gather_blocks), positions=mx.array(idx.positions),
            mask=mx.array(idx.mask), block_size=bs, backend=CASCADE if cascade else GATHER,
            cascade=cascade, query_positions=np.asarray(starts)[:, None] + np.arange(max(lengths))[None, :],
            host_mask=idx.mask, tables=idx.tables, num_blocks=self.num_slots // bs,
            num_kv_heads=self.num_kv_heads)
