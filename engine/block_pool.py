"""The KV block pool: reference counts, a free list in LRU order, and the prefix cache (hash -> block).

A block whose last reference drops goes to the tail of the free list but keeps its hash, so a later
request with the same prefix can take it back; allocation takes from the head, evicting the least
recently used cached block. Stored and removed hashes are queued as KV events for the routers.
"""

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from protocol.kv_events import KVEvent, KVEventKind


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    # Runs of at least this many blocks start at a multiple of it where a free run allows: a transfer
    # stages 64 blocks at a time (kv_transfer.nixl_transport), and an aligned run is one prepped
    # descriptor per 64 blocks on the receiving side.
    RUN_ALIGN = 64

    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 evict_to: Callable[[list[tuple[int, int]]], list[int]] | None = None):
        """evict_to: a lower tier (engine/kv_tiers.py) that takes evicted cached blocks, (block id, hash) pairs,
        before they are reused; it returns the hashes gone from it too (only those are reported removed)."""
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.reusable = np.ones(num_blocks, dtype=bool)  # free and holding no cached prefix (allocate_run)
        self.events: list[KVEvent] = []
        self.evict_to = evict_to

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def lookup_prefix(self, block_hashes: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of this hash chain (not yet referenced)."""
        hits: list[int] = []
        if not self.enable_caching:
            return hits
        for h in block_hashes:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def take(self, block_ids: list[int]) -> None:
        """Add a reference to cached blocks (a prefix hit); they leave the free list."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self.free[b]
                self.reusable[b] = False
            self.ref_counts[b] += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise NoFreeBlocksError(f"need {n} blocks, {len(self.free)} free")
        blocks = []
        evicted = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:  # evict the cached contents
                self.block_hash[b] = None
                del self.cached[h]
                evicted.append((b, h))
            self.ref_counts[b] = 1
            self.reusable[b] = False
            blocks.append(b)
        removed = [h for _, h in evicted] if self.evict_to is None or not evicted else self.evict_to(evicted)
        removed = [h for h in removed if h not in self.cached]  # a tier's copy of a block still here: not gone
        if self.evict_to is not None and evicted:
            gone = set(removed)
            moved = tuple(h for _, h in evicted if h not in gone)
            if moved:
                self.events.append(KVEvent(KVEventKind.OFFLOADED, moved))
        if removed:
            self.events.append(KVEvent(KVEventKind.REMOVED, tuple(removed)))
        return blocks

    def allocate_run(self, n: int) -> list[int] | None:
        """n adjacent blocks from the free ones that hold no cached prefix, or None if there is no such run.
        A transfer into adjacent blocks is one descriptor instead of n (kv_transfer), and taking only
        uncached blocks evicts nothing a later request could reuse. A run of RUN_ALIGN blocks or more
        starts at a multiple of RUN_ALIGN when such a start exists."""
        if n < 2 or n > len(self.free):
            return None
        ids = np.flatnonzero(self.reusable)
        if len(ids) < n:
            return None
        # ids[i + n - 1] - ids[i] == n - 1  <=>  ids[i : i + n] are adjacent
        starts = np.flatnonzero(ids[n - 1 :] - ids[: len(ids) - n + 1] == n - 1)
        if not len(starts):
            return None
        firsts = ids[starts]
        aligned = firsts[firsts % self.RUN_ALIGN == 0] if n >= self.RUN_ALIGN else firsts[:0]
        first = int(aligned[0] if len(aligned) else firsts[0])
        blocks = list(range(first, first + n))
        for b in blocks:
            del self.free[b]
            self.ref_counts[b] = 1
        self.reusable[first : first + n] = False
        return blocks

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference each; the last block of a sequence is released first, so evicted first."""
        for b in reversed(block_ids):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] < 0:
                raise RuntimeError(f"block {b} released more often than taken")
            if self.ref_counts[b] == 0:
                if self.block_hash[b] is None:
                    self.free[b] = None
                    self.free.move_to_end(b, last=False)  # uncached blocks are reused first
                    self.reusable[b] = True
                else:
                    self.free[b] = None

    def cache_blocks(self, block_ids: list[int], hashes: list[int], parent_hash: int) -> None:
        """Register full blocks under their chained hashes (a duplicate of a cached hash stays private)."""
        if not self.enable_caching:
            return
        stored = []
        for b, h in zip(block_ids, hashes, strict=True):
            if self.block_hash[b] is not None or h in self.cached:
                continue
            self.block_hash[b] = h
            self.cached[h] = b
            stored.append(h)
        if stored:
            self.events.append(KVEvent(KVEventKind.STORED, tuple(stored), parent_hash))

    def report_removed(self, block_hashes: list[int]) -> None:
        """Hashes a lower tier no longer holds either (for the routers)."""
        gone = tuple(h for h in block_hashes if h not in self.cached)  # (still in the pool: not gone)
        if gone:
            self.events.append(KVEvent(KVEventKind.REMOVED, gone))

    def drain_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events
