"""Block tables per request on top of the BlockPool: prefix lookup, allocate, free; and,
for models with recurrent layers, each request's state slot and the state snapshots that let
such a model hit the prefix cache (engine/snapshot_pool.py).

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
from shoal.engine.snapshot_pool import SnapshotPool


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
    def __init__(self, pool: BlockPool, block_size: int, num_state_slots: int = 0,
                 num_snapshots: int = 0, snapshot_interval: int = 512):
        self.pool = pool
        self.block_size = block_size
        self.states = StateSlots(num_state_slots) if num_state_slots else None
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_keys: dict[str, list[Hashable]] = {}
        self.req_num_cached: dict[str, int] = {}  # leading blocks already offered to the cache
        self.num_cache_queries = 0  # tokens looked up in the prefix cache
        self.num_cache_hits = 0  # tokens found there
        # Models with recurrent layers hit the cache only where a state snapshot exists.
        self.snapshots = (SnapshotPool(num_snapshots)
                          if self.states is not None and num_snapshots and pool.enable_caching else None)
        self.snapshot_interval = max(block_size, snapshot_interval // block_size * block_size)
        if self.snapshots is not None:
            pool.on_evict = self.snapshots.drop  # a snapshot dies with the block it ends
        self.num_snapshot_hits = 0  # admissions restored from a snapshot
        self.num_snapshot_misses = 0  # admissions of a recurrent model that started fresh
        self._restores: dict[str, int] = {}  # admitted this step: request id -> snapshot to restore
        self._pinned: list[int] = []  # snapshots read this step
        self._takes: dict[str, tuple[int, Hashable, bool]] = {}  # this step: id -> (snapshot, key, rolling)
        self._rolling: dict[str, Hashable] = {}  # each request's latest snapshot past its prompt
        self._uncomputed: set[Hashable] = set()  # keys cached this step: their K/V is being written
        # Prompt blocks that running requests are about to compute: key -> (owner, end position,
        # owner snapshots there). A request sharing them waits for the owner's snapshot.
        self._inflight: dict[Hashable, tuple[Request, int, bool]] = {}
        self._req_inflight: dict[str, list[Hashable]] = {}

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
            # A recurrent model's forwards are grouped by chunk length, not kept in schedule
            # order, so it never reads a block that this step is still writing.
            if block is None or key in self._uncomputed:
                break
            hits.append(block)
        if self.snapshots is not None:  # usable only up to the last block a snapshot ends
            while hits and self.snapshots.lookup(keys[len(hits) - 1]) is None:
                hits.pop()
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int, first: bool = True) -> None:
        """Count one admitted request's lookup (tokens), once, however long it waited; snapshot
        hits and misses only at its first admission, for prompts longer than a block."""
        if self.pool.enable_caching:
            self.num_cache_queries += num_tokens
            self.num_cache_hits += num_hit_tokens
        if self.snapshots is not None and first and num_tokens > self.block_size:
            self.num_snapshot_hits += num_hit_tokens > 0
            self.num_snapshot_misses += num_hit_tokens == 0

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
        if hits and self.snapshots is not None:  # the state at the hits' end, read this step
            snap = self.snapshots.pin(self._keys(request, len(hits))[len(hits) - 1])
            self._restores[request.request_id] = snap
            self._pinned.append(snap)
        if num_needed > 0:
            blocks.extend(self.pool.allocate(num_needed))
        self._cache_full_blocks(request, blocks, num_computed + num_new_tokens)
        return True

    def trim(self, request: Request, num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` positions (rejected drafts)."""
        blocks = self.req_blocks.get(request.request_id, [])
        keep = cdiv(num_tokens, self.block_size)
        if len(blocks) > keep:
            self.pool.free(reversed(blocks[keep:]))
            del blocks[keep:]

    def free(self, request: Request, preempted: bool = False) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_keys.pop(request.request_id, None)
        self.req_num_cached.pop(request.request_id, None)
        self.pool.free(reversed(blocks))
        if self.states is not None:
            self.states.give_back(request.request_id)
        if not preempted:  # its latest snapshot stays (the next turn's); a resumed request replaces it
            self._rolling.pop(request.request_id, None)
        self._restores.pop(request.request_id, None)
        for key in self._req_inflight.pop(request.request_id, ()):
            del self._inflight[key]

    def _cache_full_blocks(self, request: Request, blocks: list[Block], num_tokens: int) -> None:
        # Cached the moment they fill (once this step's tokens are written), so requests
        # scheduled after this one, even in the same step, can hit them.
        num_full = num_tokens // self.block_size
        done = self.req_num_cached.get(request.request_id, 0)
        if num_full <= done or not self.pool.enable_caching:
            return
        keys = self._keys(request, num_full)[:num_full]  # only blocks whose tokens are known
        for i in range(done, len(keys)):
            if self.pool.cache_block(blocks[i], keys[i]) and self.snapshots is not None:
                self._uncomputed.add(keys[i])
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

    # -- state snapshots (models with recurrent layers) ------------------------------------
    #
    #   prompt   |....K....|....K....|..L|...    K: snapshot interval, L: last block boundary
    #   chunks   [--------)[--------)[--)[--)    of the prompt (a prompt of the same tokens
    #   snapshot          ^s        ^s  ^s       hits up to there); past L, while decoding,
    #                                            each full block replaces the request's last

    def last_prompt_boundary(self, request: Request) -> int:
        """The last block boundary a request with this prompt could hit (never its last token)."""
        return (request.num_prompt_tokens - 1) // self.block_size * self.block_size

    def next_boundary(self, request: Request, start: int) -> int | None:
        """Where a prompt chunk starting at `start` must end so the state there is kept:
        the next interval multiple or the prompt's last boundary; None without snapshots."""
        if self.snapshots is None:
            return None
        last = self.last_prompt_boundary(request)
        interval = (start // self.snapshot_interval + 1) * self.snapshot_interval
        ends = [b for b in (interval, last) if start < b <= last]
        return min(ends) if ends else None

    def plan_snapshot(self, request: Request, end: int) -> int | None:
        """A snapshot id for the state after a step that computes up to `end`, if a snapshot
        belongs there and none exists; published by `end_step` once the step succeeded."""
        if self.snapshots is None or end == 0 or end % self.block_size:
            return None
        last = self.last_prompt_boundary(request)
        rolling = end > last
        if not rolling and end % self.snapshot_interval and end != last:
            return None
        key = self._keys(request, end // self.block_size)[end // self.block_size - 1]
        if self.pool.get_cached(key) is None or self.snapshots.lookup(key) is not None:
            return None
        snap = self.snapshots.reserve()
        if snap is not None:
            self._takes[request.request_id] = (snap, key, rolling)
        return snap

    def pop_restore(self, request_id: str) -> int | None:
        """The snapshot an admitted request starts from, once."""
        return self._restores.pop(request_id, None)

    def end_step(self, succeeded: set[str]) -> None:
        """After a step: publish the snapshots of the requests whose share of it succeeded
        and that are still running; give back the rest; drop this step's pins."""
        for request_id, (snap, key, rolling) in self._takes.items():
            if request_id not in succeeded or self.pool.get_cached(key) is None:
                self.snapshots.release(snap)
            elif self.snapshots.publish(snap, key) and rolling:
                previous = self._rolling.get(request_id)
                self._rolling[request_id] = key
                if previous is not None:
                    self.snapshots.drop(previous, evicted=False)
        self._takes.clear()
        for snap in self._pinned:
            self.snapshots.unpin(snap)
        self._pinned.clear()
        self._restores.clear()
        self._uncomputed.clear()

    def register_prefill(self, request: Request, num_hit_blocks: int) -> None:
        """Mark the prompt blocks an admitted request will compute, so that requests sharing
        them wait for its snapshots instead of computing them again."""
        if self.snapshots is None:
            return
        last = self.last_prompt_boundary(request)
        keys = self._keys(request, last // self.block_size)
        mine = []
        for i in range(num_hit_blocks, last // self.block_size):
            end = (i + 1) * self.block_size
            if keys[i] not in self._inflight:
                self._inflight[keys[i]] = (request, end, end % self.snapshot_interval == 0 or end == last)
                mine.append(keys[i])
        self._req_inflight[request.request_id] = mine

    def prefix_in_flight(self, request: Request, num_hit_blocks: int) -> bool:
        """Whether a running request is computing, right now, a snapshot further along this
        request's prompt than its hit: then it is worth waiting a step or a few for it."""
        if self.snapshots is None or not self._inflight:
            return False
        max_blocks = (request.num_tokens - 1) // self.block_size
        keys = self._keys(request, max_blocks)
        for i in range(num_hit_blocks, max_blocks):
            entry = self._inflight.get(keys[i])
            if entry is None:
                if self.pool.get_cached(keys[i]) is None:
                    return False  # the prompts part here
                continue
            owner, end, snapshots_here = entry
            if snapshots_here and owner.num_computed_tokens < end and self.snapshots.lookup(keys[i]) is None:
                return True
        return False
