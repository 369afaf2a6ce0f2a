"""Cascade attention over shared prefixes (Hydragen; FlashInfer's cascade), in pure MLX.

Rows of a step whose block tables start with the same physical blocks form a group. Each
group's shared prefix is attended once, for all of its rows' queries together; every row then
attends its own remaining context (its suffix), and the two partial results are merged
exactly with their log-sum-exp statistics:

    row r of group g:   out = o_p * exp(lse_p - lse) + o_s * exp(lse_s - lse)
                        lse = logaddexp(lse_p, lse_s)
    o_p, lse_p: queries of all of g's rows  @ prefix K/V of g   (one matmul, no mask)
    o_s, lse_s: each row's queries          @ its own suffix    (per-row gather, causal mask)

A row in no group has an empty prefix (lse_p = -inf), so its output is its suffix attention
unchanged (its whole context: the reference's result to ~1e-7). Query heads of a KV head are folded into
the rows of each matmul, as in `paged_attention.attention`.

Host side (`plan_cascade`, `build_cascade_indices`): numpy only, once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from shoal.kernels.paged_attention import folded_scores, gather_kv


def plan_cascade(tables: np.ndarray, limits: np.ndarray, min_blocks: int, min_rows: int = 2,
                 min_saved: int = 0) -> list[tuple[np.ndarray, int]]:
    """Groups of rows to attend a shared prefix once: `[(row indices, prefix blocks)]`.

    `tables` is (R, B), each row's physical block ids (padding past a row's table is ignored
    through `limits`); `limits[r]` is how many leading blocks row r may take as a prefix
    (blocks wholly before its first query token). Rows are sorted by table; a group is a run
    of sorted rows and its prefix their longest common run of blocks. Among the ways to cut
    the sorted rows into groups, the one chosen saves the most block reads, (rows - 1) *
    prefix blocks summed over groups, counting only groups with at least `min_rows` rows,
    `min_blocks` prefix blocks and `min_saved` blocks saved (the cost rule: below that, the
    extra ops cost more than the reads saved)."""
    num_rows, width = tables.shape
    if num_rows < min_rows or width == 0:
        return []
    # Blocks past a row's limit can never be shared: make them unique to the row.
    own = -1 - np.arange(num_rows, dtype=np.int64)[:, None]
    masked = np.where(np.arange(width)[None, :] < limits[:, None], tables, own)
    order = np.lexsort(masked.T[::-1])
    ordered = masked[order]
    lcp = np.cumprod(ordered[1:] == ordered[:-1], axis=1).sum(axis=1)  # (R - 1,)

    def best(lo: int, hi: int) -> tuple[int, list[tuple[np.ndarray, int]]]:
        if hi - lo < min_rows:
            return 0, []
        common = int(lcp[lo:hi - 1].min())
        whole = (hi - lo - 1) * common
        whole = whole if common >= min_blocks and whole >= min_saved else 0
        bounds = [lo, *(np.flatnonzero(lcp[lo:hi - 1] == common) + lo + 1).tolist(), hi]
        saved, groups = 0, []
        for a, b in zip(bounds, bounds[1:]):
            s, g = best(a, b)
            saved, groups = saved + s, groups + g
        if whole > 0 and whole >= saved:
            return whole, [(np.sort(order[lo:hi]), common)]
        return saved, groups

    return best(0, num_rows)[1]


@dataclass(frozen=True)
class CascadeGroup:
    rows: mx.array  # (n,) row indices in the forward
    prefix_blocks: mx.array  # (Hkv * P / block_size,) pool blocks of the shared prefix
    num_rows: int


@dataclass(frozen=True)
class CascadeIndices:
    """MLX indices for one cascade forward, shared by every layer."""

    groups: tuple[CascadeGroup, ...]
    suffix_blocks: mx.array  # (R * Hkv * Bs,) pool blocks of each row's suffix
    suffix_mask: mx.array  # (R, 1, L, Ss) bool: suffix slot s visible to query l of row r
    prefix_source: mx.array  # (R,) row's index among all groups' rows, or the empty slot


def build_cascade_indices(tables: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                          groups: list[tuple[np.ndarray, int]], block_size: int,
                          num_blocks: int, num_kv_heads: int) -> CascadeIndices:
    """Suffix tables start after each row's prefix; the suffix mask is the causal mask
    shifted by the prefix length. Padding slots point at the null block, masked off."""
    num_rows, width = tables.shape
    skip = np.zeros(num_rows, dtype=np.int64)
    source = np.full(num_rows, sum(len(rows) for rows, _ in groups), dtype=np.int64)
    heads = np.arange(num_kv_heads)[:, None]
    mx_groups, seen = [], 0
    for rows, num_prefix in groups:
        skip[rows] = num_prefix
        source[rows] = seen + np.arange(len(rows))
        seen += len(rows)
        prefix = heads * num_blocks + tables[rows[0], :num_prefix][None, :]
        mx_groups.append(CascadeGroup(mx.array(rows.astype(np.int32)),
                                      mx.array(prefix.reshape(-1).astype(np.int32)), len(rows)))
    ends = starts + lengths
    used = -(-ends // block_size)  # blocks holding each row's context
    suffix_width = int((used - skip).max())
    cols = skip[:, None] + np.arange(suffix_width)[None, :]
    suffix = np.where(cols < used[:, None], tables[np.arange(num_rows)[:, None], np.minimum(cols, width - 1)], 0)
    q_pos = starts[:, None] + np.arange(int(lengths.max()))[None, :]  # (R, L)
    slot_pos = skip[:, None] * block_size + np.arange(suffix_width * block_size)[None, :]  # (R, Ss)
    mask = slot_pos[:, None, None, :] <= q_pos[:, None, :, None]
    return CascadeIndices(
        groups=tuple(mx_groups),
        suffix_blocks=mx.array((heads[None] * num_blocks + suffix[:, None, :]).reshape(-1).astype(np.int32)),
        suffix_mask=mx.array(mask),
        prefix_source=mx.array(source.astype(np.int32)),
    )


def softmax_lse(scores: mx.array) -> tuple[mx.array, mx.array]:
    """Softmax over the last axis and its log-sum-exp, in float32, with one `exp` pass:
    MLX's CPU `exp` runs at ~12 ns an element (numpy's is 3.5x faster), so a separate
    `logsumexp` beside `softmax` would double the cost of attention's longest op."""
    scores = scores.astype(mx.float32)
    peak = mx.max(scores, axis=-1, keepdims=True)
    weights = mx.exp(scores - peak)
    total = weights.sum(axis=-1, keepdims=True)
    return weights / total, (peak + mx.log(total)).squeeze(-1)


def attention_with_lse(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                       mask: mx.array | None) -> tuple[mx.array, mx.array]:
    """`paged_attention.attention` (same folded layout; equal to ~1e-7, the softmax is
    computed with its statistics) plus each query's log-sum-exp of its scaled scores:
    `(R, H, L, D)`, `(R, H, L)` float32."""
    rows, heads, length, _ = queries.shape
    scores = folded_scores(queries, keys, scale, mask)
    probs, lse = softmax_lse(scores)
    return (probs.astype(values.dtype) @ values).reshape(rows, heads, length, -1), lse.reshape(rows, heads, length)


def prefix_attention(queries: mx.array, keys: mx.array, values: mx.array,
                     scale: float) -> tuple[mx.array, mx.array]:
    """All of a group's queries `(n, H, L, D)` against one shared prefix `(Hkv, P, D)`: one
    matmul per KV head, every row's query heads folded into its rows. No mask: the prefix
    lies wholly before every query."""
    rows, heads, length, dim = queries.shape
    kv_heads = keys.shape[0]
    folded = (queries * scale).reshape(rows, kv_heads, -1, dim).swapaxes(0, 1).reshape(kv_heads, -1, dim)
    scores = folded @ keys.swapaxes(-1, -2)  # (Hkv, n * rep * L, P)
    probs, lse = softmax_lse(scores)
    out = probs.astype(values.dtype) @ values  # (Hkv, n * rep * L, D)
    out = out.reshape(kv_heads, rows, -1, dim).swapaxes(0, 1).reshape(rows, heads, length, dim)
    return out, lse.reshape(kv_heads, rows, -1).swapaxes(0, 1).reshape(rows, heads, length)


def merge_attention(out_a: mx.array, lse_a: mx.array, out_b: mx.array,
                    lse_b: mx.array) -> mx.array:
    """Exact softmax attention over the union of two disjoint key sets, from each part's
    normalised output and log-sum-exp. A part with lse = -inf weighs exactly 0."""
    lse = mx.logaddexp(lse_a, lse_b)
    weight_a = mx.exp(lse_a - lse)[..., None]
    weight_b = mx.exp(lse_b - lse)[..., None]
    return (out_a * weight_a + out_b * weight_b).astype(out_a.dtype)


def gather_prefix(pool: mx.array, prefix_blocks: mx.array, num_kv_heads: int,
                  block_size: int) -> mx.array:
    """A shared prefix's K or V as one contiguous `(Hkv, P, D)` array."""
    blocks = pool.reshape(-1, block_size, pool.shape[-1])
    return mx.take(blocks, prefix_blocks, axis=0).reshape(num_kv_heads, -1, pool.shape[-1])


def cascade_attention(queries: mx.array, k_pool: mx.array, v_pool: mx.array,
                      idx: CascadeIndices, scale: float, num_kv_heads: int,
                      block_size: int) -> mx.array:
    """Attention for every row of a forward: each group's prefix once, each row's suffix,
    merged. Rows in no group get their suffix (= whole context) attention unchanged."""
    rows, heads, length, dim = queries.shape
    keys = gather_kv(k_pool, idx.suffix_blocks, rows, num_kv_heads, block_size)
    values = gather_kv(v_pool, idx.suffix_blocks, rows, num_kv_heads, block_size)
    out_s, lse_s = attention_with_lse(queries, keys, values, scale, idx.suffix_mask)
    outs, lses = [], []
    for group in idx.groups:
        q = queries if group.num_rows == rows else queries[group.rows]
        out, lse = prefix_attention(q, gather_prefix(k_pool, group.prefix_blocks, num_kv_heads, block_size),
                                    gather_prefix(v_pool, group.prefix_blocks, num_kv_heads, block_size), scale)
        outs.append(out.astype(out_s.dtype))
        lses.append(lse)
    outs.append(mx.zeros((1, heads, length, dim), out_s.dtype))  # the empty prefix of ungrouped rows
    lses.append(mx.full((1, heads, length), -mx.inf, mx.float32))
    out_p = mx.concatenate(outs)[idx.prefix_source]
    lse_p = mx.concatenate(lses)[idx.prefix_source]
    return merge_attention(out_s, lse_s, out_p, lse_p)
