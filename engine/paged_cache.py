"""A per-layer cache object that speaks mlx-lm's cache protocol over the paged pool, so
every mlx-lm attention model runs unmodified: the model calls `make_mask`, rotates with
`offset`, and `update_and_fetch` writes this step's K/V into the pool and returns each
row's gathered context.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.core as mx

from shoal.kernels.paged_attention import StepIndices, attention, gather_kv, write_kv


@dataclass(frozen=True)
class StepContext:
    """MLX copies of one step's indices, shared by every layer."""

    num_rows: int
    write_rows: mx.array
    gather_blocks: mx.array
    positions: mx.array
    mask: mx.array
    block_size: int

    @classmethod
    def from_indices(cls, idx: StepIndices, block_size: int) -> StepContext:
        return cls(num_rows=len(idx.positions), write_rows=mx.array(idx.write_rows),
                   gather_blocks=mx.array(idx.gather_blocks), positions=mx.array(idx.positions),
                   mask=mx.array(idx.mask), block_size=block_size)


class PagedKVCache:
    """One layer's view of the pool. `ctx` is set by the runner before each forward."""

    def __init__(self, k_pool: mx.array, v_pool: mx.array, num_kv_heads: int):
        self.k_pool = k_pool
        self.v_pool = v_pool
        self.num_kv_heads = num_kv_heads
        self.ctx: StepContext | None = None

    @property
    def offset(self) -> mx.array:
        return self.ctx.positions

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None,
                  **kwargs) -> mx.array:
        if window_size is not None:
            raise NotImplementedError("sliding-window attention is not supported by the paged cache")
        return self.ctx.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        ctx = self.ctx
        write_kv(self.k_pool, keys, ctx.write_rows)
        write_kv(self.v_pool, values, ctx.write_rows)
        return (gather_kv(self.k_pool, ctx.gather_blocks, ctx.num_rows, self.num_kv_heads, ctx.block_size),
                gather_kv(self.v_pool, ctx.gather_blocks, ctx.num_rows, self.num_kv_heads, ctx.block_size))

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.k_pool, self.v_pool


def install_attention(model) -> None:
    """On CPU, route attention over a PagedKVCache to `kernels.attention`, which beats MLX's
    CPU fallback of `mx.fast.scaled_dot_product_attention`. mlx-lm models call the
    `scaled_dot_product_attention` their module imported; wrapping that name dispatches on the
    cache type, so every other caller (mlx-lm's own KVCache, quantized caches) is untouched.
    On Metal and CUDA the fused kernel stays."""
    if mx.default_device() != mx.cpu:
        return
    module = sys.modules[type(model).__module__]
    original = getattr(module, "scaled_dot_product_attention", None)
    if original is None or getattr(original, "paged_dispatch", False):
        return

    def dispatch(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(cache, PagedKVCache) and sinks is None:
            return attention(queries, keys, values, scale, mask)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    dispatch.paged_dispatch = True
    module.scaled_dot_product_attention = dispatch
