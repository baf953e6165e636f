"""The host tier of the KV cache: blocks evicted from the device pool, kept in (pinned) host memory under
their chained hash, least recently used dropped first; a prefix that runs on past the device pool's hits
into this tier is copied back into device blocks and treated as a hit.

Copies go one per run of blocks adjacent on both sides. On a GPU they are queued on the engine's stream
without waiting (pinned memory): an eviction's copy runs before any later kernel can overwrite the block,
and a load's copy before the step that reads it. Offload is inclusive: a block loaded back stays here too,
so evicting it again copies nothing.
"""

from collections import OrderedDict

import torch


class HostTier:
    def __init__(self, num_blocks: int, pool: torch.Tensor):
        """num_blocks of the device pool's block shape, for that pool (the engine's KV tensor)."""
        if num_blocks < 1:
            raise ValueError("the host tier needs at least one block")
        self.num_blocks = num_blocks
        self.pool = pool
        self.store = torch.zeros((num_blocks, *pool.shape[1:]), dtype=pool.dtype, pin_memory=pool.is_cuda)
        self.slots: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, least recently used first
        self.free_slots = list(range(num_blocks - 1, -1, -1))
        self.keep: frozenset[int] = frozenset()  # hashes an admission is about to load: not dropped meanwhile
        self.pending = False  # an offload copy was queued (a GPU pool: it runs when the stream gets there)
        self.num_offloaded = 0  # blocks copied in
        self.num_loaded = 0  # blocks copied back to the device (hits)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.slots

    def lookup(self, block_hashes: list[int]) -> list[int]:
        """Slots of the longest prefix of this hash chain held here, made most recently used."""
        found = []
        for h in block_hashes:
            slot = self.slots.get(h)
            if slot is None:
                break
            self.slots.move_to_end(h)
            found.append(slot)
        return found

    def offload(self, evicted: list[tuple[int, int]]) -> list[int]:
        """Copy evicted device blocks ((block id, hash) pairs) in; returns the hashes gone from every tier of
        this worker: those dropped to make room, and an evicted one with no room left (all kept)."""
        gone: list[int] = []
        pairs: list[tuple[int, int]] = []
        for block, h in evicted:
            if h in self.slots:
                self.slots.move_to_end(h)
                continue
            if not self.free_slots:
                old = next((o for o in self.slots if o not in self.keep), None)
                if old is None:
                    gone.append(h)
                    continue
                self.free_slots.append(self.slots.pop(old))
                gone.append(old)
            slot = self.free_slots.pop()
            self.slots[h] = slot
            pairs.append((block, slot))
        for src, dst, n in _runs(pairs):
            self.store[dst : dst + n].copy_(self.pool[src : src + n], non_blocking=True)
        self.num_offloaded += len(pairs)
        self.pending = self.pending or (bool(pairs) and self.pool.is_cuda)
        return gone

    def load(self, slots: list[int], block_ids: list[int]) -> None:
        """Copy held blocks back into device blocks (queued before the step that reads them)."""
        for src, dst, n in _runs(list(zip(slots, block_ids, strict=True))):
            self.pool[dst : dst + n].copy_(self.store[src : src + n], non_blocking=True)
        self.num_loaded += len(slots)

    def settle(self) -> None:
        """Wait for queued offload copies: before blocks are written from outside the stream (a KV transfer
        into blocks just evicted)."""
        if self.pending:
            torch.cuda.current_stream(self.pool.device).synchronize()
            self.pending = False

    def clear(self) -> list[int]:
        """Forget every block (the weights changed); returns the hashes dropped."""
        dropped = list(self.slots)
        self.free_slots += self.slots.values()
        self.slots.clear()
        return dropped


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(src, dst) index pairs as runs (src start, dst start, length) adjacent on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in pairs:
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
