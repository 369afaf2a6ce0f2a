"""A per-layer cache object that speaks mlx-lm's cache protocol over the paged pool, so
every mlx-lm attention model runs unmodified: the model calls `make_mask`, rotates with
`offset`, and `update_and_fetch` writes this step's K/V into the pool and returns each
row's gathered context.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from shoal.kernels.paged_attention import StepIndices, gather_kv, write_kv


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
