"""Paged KV write and paged attention in pure MLX (portable to CPU, Metal and CUDA).

One layer's pool is a flat `(num_kv_heads * num_slots, head_dim)` array per K and V: row
`h * num_slots + slot` holds head h of the token stored in `slot` (slot = block * block_size
+ offset). The flat row layout lets one `take` produce each sequence's context already in
the `(rows, heads, seq, head_dim)` order that attention wants: measured on CPU, attention on a
transposed gather result is about 7x slower than on a contiguous one.

The index arrays come from `build_step_indices`, computed once per step in numpy and
shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class StepIndices:
    """Host-side indices for one step of R rows, L query tokens per row, S context slots."""

    write_rows: np.ndarray  # (R * Hkv * L,) pool rows receiving this step's K/V
    gather_rows: np.ndarray  # (R * Hkv * S,) pool rows holding each row's context
    positions: np.ndarray  # (R,) position of each row's first query token
    mask: np.ndarray  # (R, 1, L, S) bool: key s visible to query l of row r
    num_context: int  # S


def build_step_indices(block_tables: list[tuple[int, ...]], starts: list[int],
                       lengths: list[int], block_size: int, num_slots: int,
                       num_kv_heads: int) -> StepIndices:
    """Indices for rows whose new tokens sit at positions [start, start + length).

    Padding (query slots past a row's length, context slots past its end) points at slot
    0..block_size-1, the null block: writes there are discarded, reads are masked off.
    """
    num_rows, max_len = len(starts), max(lengths)
    starts_np = np.asarray(starts, dtype=np.int64)
    ends = starts_np + np.asarray(lengths, dtype=np.int64)
    num_ctx = int(ends.max())
    max_blocks = -(-num_ctx // block_size)
    tables = np.zeros((num_rows, max_blocks), dtype=np.int64)
    for r, table in enumerate(block_tables):
        n = min(len(table), max_blocks)
        tables[r, :n] = table[:n]
    pos = np.arange(num_ctx)
    ctx_slots = tables[:, pos // block_size] * block_size + pos % block_size  # (R, S)
    ctx_slots[pos[None, :] >= ends[:, None]] = 0

    q_pos = starts_np[:, None] + np.arange(max_len)[None, :]  # (R, L)
    q_valid = q_pos < ends[:, None]
    write_slots = np.take_along_axis(ctx_slots, np.minimum(q_pos, num_ctx - 1), axis=1)
    write_slots[~q_valid] = 0

    heads = (np.arange(num_kv_heads) * num_slots)[None, :, None]
    mask = pos[None, None, None, :] <= q_pos[:, None, :, None]
    return StepIndices(
        write_rows=(heads + write_slots[:, None, :]).reshape(-1).astype(np.int32),
        gather_rows=(heads + ctx_slots[:, None, :]).reshape(-1).astype(np.int32),
        positions=starts_np.astype(np.int32),
        mask=mask,
        num_context=num_ctx,
    )


def write_kv(pool: mx.array, new: mx.array, write_rows: mx.array) -> None:
    """Scatter new K or V `(R, Hkv, L, D)` into `pool` in place (MLX donates the buffer)."""
    pool[write_rows] = new.reshape(-1, new.shape[-1])


def gather_kv(pool: mx.array, gather_rows: mx.array, num_rows: int, num_kv_heads: int,
              num_context: int) -> mx.array:
    """Each row's context as a contiguous `(R, Hkv, S, D)` array."""
    return mx.take(pool, gather_rows, axis=0).reshape(num_rows, num_kv_heads, num_context, -1)


def paged_attention(queries: mx.array, k_pool: mx.array, v_pool: mx.array, gather_rows: mx.array,
                    mask: mx.array, scale: float) -> mx.array:
    """Reference paged attention: gather each row's context, then masked SDPA."""
    rows, _, _, _ = queries.shape
    hkv = gather_rows.size // (rows * mask.shape[-1])
    keys = gather_kv(k_pool, gather_rows, rows, hkv, mask.shape[-1])
    values = gather_kv(v_pool, gather_rows, rows, hkv, mask.shape[-1])
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
