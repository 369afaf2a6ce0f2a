"""Block tables per request on top of the BlockPool: prefix lookup, allocate, free; and,
for models with recurrent layers, each request's state slot.

Token accounting for one request (block_size 4):

    tokens    | p p p p | p p p p | p p o o | o . . . |
    blocks    |   b5    |   b2    |   b8    |   b1    |
              `--- full, cached under chained keys ---'  `- partial: never cached
    key(b2) = (hash(key(b5)), tokens of b2, cache_salt)
"""

from __future__ import annotations

from collections.abc import Hashable

from shoal.engine.block_pool import Block, BlockPool
from shoal.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class StateSlots:
    """A fixed pool of recurrent-state slots (the arrays live in the model runner): one per
    running request, taken at admission, given back on finish, abort and preemption."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self.req_slot: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def slot(self, request_id: str) -> int:
        return self.req_slot.get(request_id, -1)

    def take(self, request_id: str) -> bool:
        """A slot for the request if it has none; False when none is free."""
        if request_id in self.req_slot:
            return True
        if not self._free:
            return False
        self.req_slot[request_id] = self._free.pop()
        return True

    def give_back(self, request_id: str) -> None:
        slot = self.req_slot.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, num_state_slots: int = 0):
        self.pool = pool
        self.block_size = block_size
        self.states = StateSlots(num_state_slots) if num_state_slots else None
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_keys: dict[str, list[Hashable]] = {}
        self.req_num_cached: dict[str, int] = {}  # leading blocks already offered to the cache
        self.num_cache_queries = 0  # tokens looked up in the prefix cache
        self.num_cache_hits = 0  # tokens found there

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> list[Block]:
        """Longest run of cached full blocks matching the request's tokens. Never covers the
        last token: its logits must be computed."""
        if not self.pool.enable_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        keys = self._keys(request, max_blocks)
        hits: list[Block] = []
        for key in keys[:max_blocks]:
            block = self.pool.get_cached(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (tokens), once, however long it waited."""
        if self.pool.enable_caching:
            self.num_cache_queries += num_tokens
            self.num_cache_hits += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[Block] | None = None) -> bool:
        """Grow the request's block table to hold its computed tokens, `new_computed_blocks`
        (prefix hits, counted as computed) and `num_new_tokens` more. False, with nothing
        changed, when the pool is too small."""
        hits = new_computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        num_needed = cdiv(num_computed + num_new_tokens, self.block_size) - len(blocks) - len(hits)
        num_evictable_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if max(num_needed, 0) + num_evictable_hits > self.pool.num_free_blocks:
            return False
        if self.states is not None and not self.states.take(request.request_id):
            return False
        self.pool.touch(hits)
        blocks.extend(hits)
        if num_needed > 0:
            blocks.extend(self.pool.allocate(num_needed))
        self._cache_full_blocks(request, blocks, num_computed + num_new_tokens)
        return True

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_keys.pop(request.request_id, None)
        self.req_num_cached.pop(request.request_id, None)
        self.pool.free(reversed(blocks))
        if self.states is not None:
            self.states.give_back(request.request_id)

    def _cache_full_blocks(self, request: Request, blocks: list[Block], num_tokens: int) -> None:
        # Cached the moment they fill (once this step's tokens are written), so requests
        # scheduled after this one, even in the same step, can hit them.
        num_full = num_tokens // self.block_size
        done = self.req_num_cached.get(request.request_id, 0)
        if num_full <= done or not self.pool.enable_caching:
            return
        keys = self._keys(request, num_full)[:num_full]  # only blocks whose tokens are known
        for i in range(done, len(keys)):
            self.pool.cache_block(blocks[i], keys[i])
        self.req_num_cached[request.request_id] = len(keys)

    def _keys(self, request: Request, num_blocks: int) -> list[Hashable]:
        """Chained keys of the request's first `num_blocks` full blocks, extended lazily."""
        keys = self.req_keys.setdefault(request.request_id, [])
        if len(keys) >= num_blocks:
            return keys
        tokens = request.all_token_ids
        bs = self.block_size
        for i in range(len(keys), min(num_blocks, len(tokens) // bs)):
            parent = hash(keys[-1]) if keys else None
            keys.append((parent, tuple(tokens[i * bs:(i + 1) * bs]), request.cache_salt))
        return keys
