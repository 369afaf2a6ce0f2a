"""Every KV block, its ref count, an O(1) LRU free list and the prefix-cache map.

Pure Python: the pool hands out block ids; the MLX arrays behind them live in the model
runner. Block 0 is the null block: padding tokens write there and it is never handed out.

    free list (LRU order, head evicted first)
    head <-> b7 <-> b3 <-> b9 <-> tail       b3 may still carry a cached hash: a later
                                              prefix hit takes it back off the list.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev", "next")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Hashable | None = None  # set while the block is in the prefix cache
        self.prev: Block | None = None
        self.next: Block | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Intrusive doubly linked list of free blocks: O(1) append, pop and remove-from-middle."""

    def __init__(self, blocks: Iterable[Block]):
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: Block) -> None:
        last = self._tail.prev
        assert last is not None
        last.next, block.prev = block, last
        block.next, self._tail.prev = self._tail, block
        self.num_free += 1

    def popleft(self) -> Block:
        block = self._head.next
        if block is None or block is self._tail:
            raise RuntimeError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        assert block.prev is not None and block.next is not None, "block is not in the free list"
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.num_free -= 1

    def block_ids(self) -> list[int]:
        """Free block ids from head (evicted first) to tail; for tests and debugging."""
        ids, block = [], self._head.next
        while block is not None and block is not self._tail:
            ids.append(block.block_id)
            block = block.next
        return ids


class BlockPool:
    """Owns `num_blocks` blocks (including the null block 0)."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached: dict[Hashable, Block] = {}
        self.on_evict: Callable[[Hashable], None] | None = None  # told each key that leaves the cache

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        """Fraction of allocatable blocks held by requests (0-1)."""
        total = self.num_blocks - 1
        return (total - self.num_free_blocks) / total

    def allocate(self, num: int) -> list[Block]:
        """Pop `num` blocks from the LRU head, evicting any cached hash they still carry."""
        if num > self.num_free_blocks:
            raise RuntimeError(f"asked for {num} blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(num):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on cached blocks found by a prefix hit."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference each; blocks reaching zero go to the LRU tail in the order
        given (callers pass a request's blocks last-first so its tail is evicted first)."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"double free of {block}"
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def get_cached(self, key: Hashable) -> Block | None:
        return self.cached.get(key) if self.enable_caching else None

    def cache_block(self, block: Block, key: Hashable) -> bool:
        """Register a full block under its chained key; the first writer of a key wins.
        Returns whether this call cached it."""
        if not self.enable_caching or block.block_hash is not None or key in self.cached:
            return False
        block.block_hash = key
        self.cached[key] = block
        return True

    def uncache(self, blocks: Iterable[Block]) -> None:
        """Drop these blocks' hashes: their contents can no longer be trusted."""
        for block in blocks:
            self._evict(block)

    def reset_cache(self) -> int:
        """Forget every cached block no request holds; returns how many were dropped."""
        dropped = 0
        for key, block in list(self.cached.items()):
            if block.ref_cnt == 0:
                self._evict(block)
                dropped += 1
        return dropped

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            del self.cached[block.block_hash]
            if self.on_evict is not None:
                self.on_evict(block.block_hash)
            block.block_hash = None
