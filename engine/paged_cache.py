"""A per-layer cache object that speaks mlx-lm's cache protocol over the paged pool, so
every mlx-lm attention model runs unmodified: the model calls `make_mask`, rotates with
`offset`, and `update_and_fetch` writes this step's K/V into the pool and returns each
row's gathered context. The attention call itself goes to the forward's backend
(`engine/attention.py`) through `install_attention`.
"""

from __future__ import annotations

import sys

import mlx.core as mx

from shoal.engine.attention import StepContext
from shoal.kernels.paged_attention import gather_kv, write_kv


class PagedKVCache:
    """One layer's view of the pool. `ctx` is set by the runner before each forward."""

    def __init__(self, k_pool: mx.array, v_pool: mx.array, num_kv_heads: int, window: int | None = None):
        self.k_pool = k_pool
        self.v_pool = v_pool
        self.num_kv_heads = num_kv_heads
        self.window = window  # a sliding-window layer attends its last `window` tokens
        self.ctx: StepContext | None = None

    @property
    def offset(self) -> mx.array:
        return self.ctx.positions

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None,
                  **kwargs) -> mx.array:
        # A model asks for its sliding-window mask on a sliding layer's cache (gemma3 takes
        # it from cache[0]); the backend applies each layer's own window when it attends.
        if self.window is not None and window_size in (None, self.window):
            return self.ctx.window_view(self.window).mask  # matches what update_and_fetch returns
        return self.ctx.mask if window_size is None else self.ctx.window_mask(window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write, then return the full gather. A backend that reads the pool itself leaves
        it unused, and MLX, being lazy, never computes it."""
        ctx = self.ctx
        write_kv(self.k_pool, keys, ctx.write_rows)
        write_kv(self.v_pool, values, ctx.write_rows)
        # A sliding-window layer gathers only the blocks its window reaches.
        blocks = ctx.gather_blocks if self.window is None else ctx.window_view(self.window).gather_blocks
        return (gather_kv(self.k_pool, blocks, ctx.num_rows, self.num_kv_heads, ctx.block_size),
                gather_kv(self.v_pool, blocks, ctx.num_rows, self.num_kv_heads, ctx.block_size))

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.k_pool, self.v_pool


def install_attention(model) -> None:
    """Route attention over a PagedKVCache to the forward's backend. mlx-lm models call the
    `scaled_dot_product_attention` their module imported; wrapping that name dispatches on the
    cache type, so every other caller (mlx-lm's own KVCache, quantized caches) is untouched.
    A model that calls MLX's kernel directly still gets the right answer from the full
    gather `update_and_fetch` returns; it just never uses cascade."""
    module = sys.modules[type(model).__module__]
    original = getattr(module, "scaled_dot_product_attention", None)
    if original is None or getattr(original, "paged_dispatch", False):
        return

    def dispatch(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(cache, PagedKVCache) and sinks is None:
            return cache.ctx.backend.attend(cache.ctx, cache, queries, keys, values, scale, mask, original)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    dispatch.paged_dispatch = True
    module.scaled_dot_product_attention = dispatch
