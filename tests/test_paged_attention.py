"""The paged kernels against plain dense attention, row by row."""

import mlx.core as mx
import numpy as np

import pytest

from shoal.kernels.paged_attention import attention, build_step_indices, paged_attention, write_kv


def test_paged_attention_equals_dense_per_row():
    rng = np.random.default_rng(0)
    block_size, num_blocks, hkv, heads, dim = 4, 32, 2, 4, 8
    num_slots = num_blocks * block_size
    starts, lengths = [0, 5, 9], [7, 1, 3]  # a prefill, a decode, a chunk
    tables = [(3, 7), (1, 2, 9), (4, 5, 6)]
    k_pool = mx.zeros((hkv * num_slots, dim))
    v_pool = mx.zeros((hkv * num_slots, dim))
    # Earlier context already in the pool, at the slots the block tables name.
    ctx_k = [mx.array(rng.normal(size=(hkv, s + n, dim)).astype(np.float32)) for s, n in zip(starts, lengths)]
    ctx_v = [mx.array(rng.normal(size=(hkv, s + n, dim)).astype(np.float32)) for s, n in zip(starts, lengths)]
    prior = build_step_indices(tables, [0] * 3, [max(s, 1) for s in starts], block_size, num_slots, hkv)
    L = max(max(s, 1) for s in starts)
    pad = lambda x, s: mx.pad(x[:, :max(s, 1)], [(0, 0), (0, L - max(s, 1)), (0, 0)])
    write_kv(k_pool, mx.stack([pad(k, s) for k, s in zip(ctx_k, starts)]), mx.array(prior.write_rows))
    write_kv(v_pool, mx.stack([pad(v, s) for v, s in zip(ctx_v, starts)]), mx.array(prior.write_rows))
    # This step's new tokens.
    idx = build_step_indices(tables, starts, lengths, block_size, num_slots, hkv)
    L = max(lengths)
    new = lambda ctx: mx.stack([mx.pad(c[:, s:s + n], [(0, 0), (0, L - n), (0, 0)]) for c, s, n in zip(ctx, starts, lengths)])
    write_kv(k_pool, new(ctx_k), mx.array(idx.write_rows))
    write_kv(v_pool, new(ctx_v), mx.array(idx.write_rows))
    q = mx.array(rng.normal(size=(3, heads, L, dim)).astype(np.float32))
    out = paged_attention(q, k_pool, v_pool, mx.array(idx.gather_blocks), mx.array(idx.mask),
                          scale=dim ** -0.5, block_size=block_size)
    for r, (s, n) in enumerate(zip(starts, lengths)):
        causal = mx.array(np.arange(s + n)[None, :] <= (s + np.arange(n))[:, None])
        want = mx.fast.scaled_dot_product_attention(q[r:r + 1, :, :n], ctx_k[r][None], ctx_v[r][None],
                                                    scale=dim ** -0.5, mask=causal)
        assert mx.allclose(out[r:r + 1, :, :n], want, atol=1e-5).item(), f"row {r}"
    # Padding writes land in the null block only.
    assert set((idx.write_rows % num_slots).tolist()) - set(range(block_size)) == {
        t * block_size + p % block_size for tb, s, n in zip(tables, starts, lengths)
        for p in range(s, s + n) for t in [tb[p // block_size]]} - set(range(block_size))


@pytest.mark.parametrize("rows,heads,kv_heads,length,context", [
    (1, 9, 3, 1, 37), (4, 9, 3, 1, 300), (1, 4, 2, 37, 37), (2, 9, 3, 16, 64), (1, 4, 1, 200, 200), (3, 4, 4, 5, 40)])
def test_folded_attention_is_bit_identical_to_mlx_sdpa(rows, heads, kv_heads, length, context):
    """The CPU speed path against its reference, mx.fast.scaled_dot_product_attention
    (tests run on MLX's reference BLAS, where the two agree exactly)."""
    rng = np.random.default_rng(rows * 100 + length)
    q, k, v = (mx.array(rng.normal(size=shape).astype(np.float32)) for shape in (
        (rows, heads, length, 64), (rows, kv_heads, context, 64), (rows, kv_heads, context, 64)))
    causal = np.arange(context)[None, :] <= (context - length + np.arange(length))[:, None]
    mask = mx.array(np.broadcast_to(causal, (rows, 1, length, context)))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=None if length == 1 else "causal")
    assert mx.array_equal(attention(q, k, v, 0.125, None if length == 1 else mask), want).item()
    assert mx.array_equal(attention(q, k, v, 0.125, mask), want).item()
