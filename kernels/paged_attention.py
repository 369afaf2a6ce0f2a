"""Paged KV write and paged attention in pure MLX (portable to CPU, Metal and CUDA).

One layer's pool is a flat `(num_kv_heads * num_slots, head_dim)` array per K and V: row
`h * num_slots + slot` holds head h of the token stored in `slot` (slot = block * block_size
+ offset). Writes scatter single rows. Reads view the same memory as `(num_kv_heads *
num_blocks, block_size, head_dim)`, where entry `h * num_blocks + block` is one contiguous
block of head h, so one `take` of whole blocks yields each sequence's context already in the
`(rows, heads, seq, head_dim)` order attention wants. Measured on CPU: attention on a
transposed gather result is about 7x slower than on a contiguous one, and block-sized copies
beat row-sized ones by about 10%.

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
    gather_blocks: np.ndarray  # (R * Hkv * B,) pool blocks holding each row's context
    positions: np.ndarray  # (R,) position of each row's first query token
    mask: np.ndarray  # (R, 1, L, S) bool: key s visible to query l of row r
    num_context: int  # S = B * block_size, padded to whole blocks
    tables: np.ndarray  # (R, B) each row's block ids, the null block past its table


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
    max_blocks = -(-int(ends.max()) // block_size)
    num_ctx = max_blocks * block_size
    tables = np.zeros((num_rows, max_blocks), dtype=np.int64)  # missing blocks: the null block
    for r, table in enumerate(block_tables):
        n = min(len(table), max_blocks)
        tables[r, :n] = table[:n]

    q_pos = starts_np[:, None] + np.arange(max_len)[None, :]  # (R, L)
    write_slots = tables[np.arange(num_rows)[:, None], np.minimum(q_pos // block_size, max_blocks - 1)]
    write_slots = write_slots * block_size + q_pos % block_size
    write_slots[q_pos >= ends[:, None]] = 0

    num_blocks = num_slots // block_size
    heads = np.arange(num_kv_heads)[None, :, None]
    mask = np.arange(num_ctx)[None, None, None, :] <= q_pos[:, None, :, None]
    return StepIndices(
        write_rows=(heads * num_slots + write_slots[:, None, :]).reshape(-1).astype(np.int32),
        gather_blocks=(heads * num_blocks + tables[:, None, :]).reshape(-1).astype(np.int32),
        positions=starts_np.astype(np.int32),
        mask=mask,
        num_context=num_ctx,
        tables=tables,
    )


def write_kv(pool: mx.array, new: mx.array, write_rows: mx.array) -> None:
    """Scatter new K or V `(R, Hkv, L, D)` into `pool` in place (MLX donates the buffer)."""
    pool[write_rows] = new.reshape(-1, new.shape[-1])


def gather_kv(pool: mx.array, gather_blocks: mx.array, num_rows: int, num_kv_heads: int,
              block_size: int) -> mx.array:
    """Each row's context as a contiguous `(R, Hkv, S, D)` array."""
    blocks = pool.reshape(-1, block_size, pool.shape[-1])
    return mx.take(blocks, gather_blocks, axis=0).reshape(num_rows, num_kv_heads, -1, pool.shape[-1])


def paged_attention(queries: mx.array, k_pool: mx.array, v_pool: mx.array, gather_blocks: mx.array,
                    mask: mx.array, scale: float, block_size: int) -> mx.array:
    """Reference paged attention: gather each row's context, then masked SDPA."""
    rows, hkv = queries.shape[0], gather_blocks.size * block_size // (queries.shape[0] * mask.shape[-1])
    keys = gather_kv(k_pool, gather_blocks, rows, hkv, block_size)
    values = gather_kv(v_pool, gather_blocks, rows, hkv, block_size)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def folded_scores(queries: mx.array, keys: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """Masked scaled scores `(R, Hkv, rep * L, S)`, the query heads of each KV head folded
    into the rows of one matmul; folded rows are ordered (head in group, query position)."""
    rows, heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    scores = (queries * scale).reshape(rows, kv_heads, group * length, dim) @ keys.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mx.tile(mask, (1, 1, group, 1)) if length > 1 else mask, scores, -mx.inf)
    return scores


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
              mask: mx.array | None) -> mx.array:
    """Scaled dot-product attention with the query heads of each KV head folded into the
    rows of one matmul: `(R, Hkv, rep * L, D) @ (R, Hkv, D, S)`. MLX's CPU fallback for
    `mx.fast.scaled_dot_product_attention` (the reference) broadcasts K and V over the head
    groups instead; measured 1.65x slower at 16 x 1600 tokens. Same result bit for bit under
    the reference BLAS. `mask` is (R, 1, L, S) bool or None."""
    rows, heads, length, _ = queries.shape
    probs = mx.softmax(folded_scores(queries, keys, scale, mask), axis=-1, precise=True)
    return (probs @ values).reshape(rows, heads, length, -1)
