"""BlockPool and KVCacheManager: ref counts, LRU order, null block, prefix keys. No MLX."""

import pytest

from shoal.engine.block_pool import BlockPool
from shoal.engine.kv_cache_manager import KVCacheManager
from shoal.engine.request import Request
from shoal.engine.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), cache_salt=salt)


def test_null_block_never_allocated_and_counts():
    pool = BlockPool(5)
    assert pool.num_free_blocks == 4
    blocks = pool.allocate(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_lru_order_free_tail_and_reverse():
    pool = BlockPool(6)
    a = pool.allocate(2)  # 1, 2
    b = pool.allocate(2)  # 3, 4
    assert pool.free_queue.block_ids() == [5]
    pool.free(reversed(a))  # request a's last block should be evicted first
    assert pool.free_queue.block_ids() == [5, 2, 1]
    pool.free(reversed(b))
    assert pool.free_queue.block_ids() == [5, 2, 1, 4, 3]
    assert [blk.block_id for blk in pool.allocate(3)] == [5, 2, 1]


def test_ref_counts_shared_block():
    pool = BlockPool(4)
    (blk,) = pool.allocate(1)
    pool.cache_block(blk, "k")
    pool.free([blk])
    assert blk.ref_cnt == 0 and pool.num_free_blocks == 3
    pool.touch([blk])  # a prefix hit takes it back off the free list
    pool.touch([blk])
    assert blk.ref_cnt == 2 and pool.num_free_blocks == 2
    pool.free([blk])
    assert pool.num_free_blocks == 2
    pool.free([blk])
    assert pool.num_free_blocks == 3
    with pytest.raises(AssertionError):
        pool.free([blk])


def test_eviction_drops_cached_key():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    pool.cache_block(blocks[0], "a")
    pool.free(blocks)
    assert pool.get_cached("a") is blocks[0]
    pool.allocate(2)  # reuses both: the cached key must go
    assert pool.get_cached("a") is None


def test_manager_allocate_free_and_growth():
    kv = KVCacheManager(BlockPool(10), block_size=4)
    req = make_request("r", list(range(10)))
    assert kv.allocate_slots(req, 10)
    assert len(kv.block_ids("r")) == 3
    req.num_computed_tokens = 10
    assert kv.allocate_slots(req, 2)  # 12 tokens still fit in 3 blocks
    assert len(kv.block_ids("r")) == 3
    req.num_computed_tokens = 12
    assert kv.allocate_slots(req, 1)
    assert len(kv.block_ids("r")) == 4
    assert not kv.allocate_slots(req, 100)  # too big: nothing changes
    assert len(kv.block_ids("r")) == 4
    kv.free(req)
    assert kv.pool.num_free_blocks == 9


def test_prefix_hit_chain_cap_and_salt():
    kv = KVCacheManager(BlockPool(20), block_size=4)
    first = make_request("a", list(range(12)))
    assert kv.allocate_slots(first, 12)  # 3 full blocks, cached as they fill
    same = make_request("b", list(range(12)))
    hits = kv.get_computed_blocks(same)
    assert len(hits) == 2  # never covers the last token: (12 - 1) // 4
    assert [h.block_id for h in hits] == kv.block_ids("a")[:2]
    longer = make_request("c", list(range(12)) + [99])
    assert len(kv.get_computed_blocks(longer)) == 3
    diverged = make_request("d", [0, 1, 2, 3, 7, 5, 6, 7, 8])
    assert len(kv.get_computed_blocks(diverged)) == 1  # chain breaks at block 2
    salted = make_request("e", list(range(12)) + [99], salt="tenant-2")
    assert kv.get_computed_blocks(salted) == []
