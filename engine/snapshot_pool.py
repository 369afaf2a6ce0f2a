"""Recurrent-state snapshots for prefix caching on hybrid models. Pure Python: the pool hands
out snapshot ids; the arrays behind them (one copy of every recurrent layer's state per id)
live in the model runner.

The state after token t depends on every token up to t, so cached attention blocks are reusable
by a hybrid model only together with the state at exactly their end. A snapshot is keyed by the
chained hash of the block it ends (the block pool's key), and lives and dies with that block.

    tokens     | b0 | b1 | b2 | b3 | b4 | b5 | b6 |        block_size 4, interval 8
    snapshots            ^s        ^s        ^s            at the end of b1, b3, b5
    a prompt matching b0..b6 hits b0..b5: the longest cached run that ends at a snapshot

A snapshot id goes through: free -> reserved (a step is computing it) -> published (lookups find
it) -> free. Restoring pins it for the step, so it is never reused under a reader.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class SnapshotPool:
    def __init__(self, num_snapshots: int):
        self.num_snapshots = num_snapshots
        self._free = list(range(num_snapshots - 1, -1, -1))
        self._published: OrderedDict[Hashable, int] = OrderedDict()  # key -> id, least recent first
        self._pins: dict[int, int] = {}  # id -> readers (restores) in the current step
        self._dead: set[int] = set()  # unpublished while pinned: freed at the last unpin
        self.num_evictions = 0  # published snapshots dropped for room or with their block

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_published(self) -> int:
        return len(self._published)

    @property
    def usage(self) -> float:
        """Fraction of snapshot ids in use (reserved or published), 0-1."""
        return 1.0 - len(self._free) / self.num_snapshots if self.num_snapshots else 0.0

    def lookup(self, key: Hashable) -> int | None:
        return self._published.get(key)

    def pin(self, key: Hashable) -> int:
        """Take a reader's hold on the published snapshot under `key`; returns its id."""
        snap = self._published[key]
        self._published.move_to_end(key)
        self._pins[snap] = self._pins.get(snap, 0) + 1
        return snap

    def unpin(self, snap: int) -> None:
        left = self._pins.pop(snap) - 1
        if left:
            self._pins[snap] = left
        elif snap in self._dead:
            self._dead.discard(snap)
            self._free.append(snap)

    def reserve(self) -> int | None:
        """A free id for a step to write into, evicting the least recently used unpinned
        snapshot when none is free; None when every id is reserved or pinned."""
        if not self._free:
            victim = next((k for k, s in self._published.items() if s not in self._pins), None)
            if victim is None:
                return None
            self.drop(victim)
        return self._free.pop() if self._free else None

    def publish(self, snap: int, key: Hashable) -> bool:
        """Make a reserved id findable under `key`; if the key already has a snapshot, the id
        is given back instead (the first writer wins, as for blocks)."""
        if key in self._published:
            self._free.append(snap)
            return False
        self._published[key] = snap
        return True

    def release(self, snap: int) -> None:
        """Give back a reserved id that was never published (its step failed or was aborted)."""
        self._free.append(snap)

    def drop(self, key: Hashable, evicted: bool = True) -> None:
        """Forget the snapshot under `key` (its block left the cache, or it was replaced)."""
        snap = self._published.pop(key, None)
        if snap is None:
            return
        self.num_evictions += evicted
        if snap in self._pins:
            self._dead.add(snap)
        else:
            self._free.append(snap)

    def published_keys(self) -> list[Hashable]:
        """Keys from least to most recently used; for tests and debugging."""
        return list(self._published)
