"""A per-layer cache object that speaks mlx-lm's cache protocol over the paged pool, so
every mlx-lm attention model runs unmodified: the model calls `make_mask`, rotates with
`offset`, and `update_and_fetch` writes this step's K/V into the pool and returns each
row's gathered context. The attention call itself goes to the forward's backend
(`engine/attention.py`) through `install_attention`.
"""

from __future__ import annotations

import sys

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

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

    # What mlx-lm's pipelined models tie the send to (`cache.keys = mx.depends(cache.keys, h)`).
    @property
    def keys(self) -> mx.array:
        return self.k_pool

    @keys.setter
    def keys(self, value: mx.array) -> None:
        self.k_pool = value


class PagedStateCache(ArraysCache):
    """One recurrent layer's view of the state pool (one slot per running request), speaking
    mlx-lm's ArraysCache protocol. `cache[i]` reads this forward's rows' state i from their
    slots (None when every row starts fresh, as a new ArraysCache does); `cache[i] = x` keeps
    the new state pending until the runner commits the step. Rows are never padded
    (`plan_unpadded`), so `lengths` is None and no mask is needed. `snapshots` holds copies of
    states at block boundaries (prefix caching): restored into a slot, taken from one."""

    lengths = None
    left_padding = None

    def __init__(self, pools: list[mx.array], snapshots: list[mx.array] | None = None):
        # Not ArraysCache's constructor: nothing of its state is used.
        self.pools = pools
        self.snapshots = snapshots or []
        self._slots: list[int] = []
        self._index: mx.array | None = None
        self._fresh = True
        self._values: list[mx.array | None] = []  # this forward's reads and writes
        self._pending: list[tuple[list[int], int, mx.array]] = []  # (slots, index, value) per write

    def begin(self, slots: list[int], fresh: bool) -> None:
        """Address the next forward's rows: their slots, and whether they all start fresh."""
        self._slots, self._fresh = slots, fresh
        self._index = mx.array(slots)
        self._values = [None] * len(self.pools)

    def __getitem__(self, i: int) -> mx.array | None:
        if self._values[i] is None and not self._fresh:
            self._values[i] = self.pools[i][self._index]
        return self._values[i]

    def __setitem__(self, i: int, value: mx.array) -> None:
        self._values[i] = value
        self._pending.append((self._slots, i, value))

    def advance(self, n: int) -> None:
        pass

    def make_mask(self, N: int, **kwargs) -> None:
        return None

    def pending_values(self) -> list[mx.array]:
        return [value for _, _, value in self._pending]

    def commit(self) -> None:
        """Write the step's new states into their slots (a later write to a slot wins), one
        slice per run of consecutive slots: MLX's CPU scatter of 32 rows of a Qwen3.5 delta
        state took 38 ms a layer, the same rows as slices 3 ms."""
        for slots, i, value in self._pending:
            value = value.astype(self.pools[i].dtype)
            for start, end, row in _runs(slots):
                self.pools[i][start:end] = value[row:row + end - start]
        if self._pending:
            mx.async_eval(self.pools)
        self._pending = []

    def discard(self) -> None:
        self._pending = []

    def restore(self, pairs: list[tuple[int, int]]) -> None:
        """Copy snapshots into slots, (slot, snapshot) each, before a forward reads them."""
        for slot, snap in pairs:
            for pool, snapshots in zip(self.pools, self.snapshots):
                pool[slot] = snapshots[snap]

    def take(self, pairs: list[tuple[int, int]]) -> None:
        """Copy committed slots into snapshots, (slot, snapshot) each."""
        for slot, snap in pairs:
            for pool, snapshots in zip(self.pools, self.snapshots):
                snapshots[snap] = pool[slot]
        if pairs:
            mx.async_eval(self.snapshots)

    @property
    def state(self) -> list[mx.array]:
        return self.pools + self.snapshots


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(first slot, last slot + 1, first row) of each run of consecutive slots, in row order."""
    runs, row = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((slots[row], slots[i - 1] + 1, row))
            row = i
    return runs


def install_attention(model) -> None:
    """Route attention over a PagedKVCache to the forward's backend. mlx-lm models call the
    `scaled_dot_product_attention` their module imported; wrapping that name, in every module
    the model's layers come from (qwen3_5 borrows qwen3_next's attention), dispatches on the
    cache type, so every other caller (mlx-lm's own KVCache, quantized caches) is untouched.
    A model that calls MLX's kernel directly still gets the right answer from the full
    gather `update_and_fetch` returns; it just never uses cascade."""
    for name in sorted({type(m).__module__ for m in model.modules()}):
        module = sys.modules.get(name)
        original = getattr(module, "scaled_dot_product_attention", None)
        if original is None or getattr(original, "paged_dispatch", False):
            continue
        module.scaled_dot_product_attention = _paged_dispatch(original)


def _paged_dispatch(original):
    def dispatch(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(cache, PagedKVCache) and sinks is None:
            return cache.ctx.backend.attend(cache.ctx, cache, queries, keys, values, scale, mask, original)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    dispatch.paged_dispatch = True
    return dispatch
