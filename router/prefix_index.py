"""Which worker holds which KV blocks, by chained block hash; bounded per worker by LRU.

Fed at once by the router's own decisions and corrected by the workers' KV events. Because hashes chain,
a worker holding block i's hash holds the whole prefix up to i. A block a worker reports removed stays in the
index as held before (its value 0) until the bound drops it: a prompt whose prefix was evicted from every
worker is one that came back, which the policy places where it will last (router.policy).

Each worker's blocks are a plain dict of ints to ints (IN_DEVICE: held in its device pool, HELD: held in a
lower tier, host memory or disk, 0: held before), oldest first. CPython's cycle collector
does not track a dict whose keys and values are all ints, bools and None, so an index of millions of blocks
adds nothing to its pauses; an OrderedDict is walked entry by entry on every full collection (16 workers x 200k
blocks: 73.8 ms a full collection on the CI machine, 0.9 ms as dicts), and at full load full collections came
every 0.7-1.1 s (bench.router_overhead). A
touched block is re-inserted at the end. Over the bound, the oldest sixteenth goes at once: evicting from the
front walks the deleted entries a dict keeps there until it next resizes, so doing it one block at a time
would walk them on every insertion.
"""

from itertools import islice

EVICT_BATCH = 16  # over the bound, 1/16 of it is evicted at once
HELD, IN_DEVICE = 1, 2  # a block's value: held (in some tier of the worker's cache), and in its device pool


class PrefixIndex:
    def __init__(self, max_blocks_per_worker: int = 200_000):
        self.max_blocks = max_blocks_per_worker
        self.by_worker: dict[str, dict[int, int]] = {}

    def match(self, worker: str, hashes: list[int], level: int = HELD, upto: int | None = None) -> int:
        """Number of leading blocks of this chain (of its first `upto`) the worker holds; with level IN_DEVICE,
        in its device pool (a pool evicts a sequence tail first, so what moved down to a lower tier is the
        chain's tail)."""
        held = self.by_worker.get(worker)
        if not held:
            return 0
        # Binary search: holding block i implies holding every block before it (the chain).
        lo, hi = 0, len(hashes) if upto is None else upto
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if held.get(hashes[mid - 1], 0) >= level:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def match_seen(self, worker: str, hashes: list[int], matched: int = 0) -> int:
        """Number of leading blocks of this chain the worker holds or held before (evicted since); `matched`:
        how many it holds, if known (then one lookup where the next block was never there, the usual case)."""
        held = self.by_worker.get(worker)
        if not held or matched == len(hashes) or hashes[matched] not in held:
            return matched
        lo, hi = matched + 1, len(hashes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in held:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def add(self, worker: str, hashes: list[int]) -> None:
        """The worker holds (and just used) this chain. Its blocks become the most recent, the first block most
        recent of all, so a chain is evicted tail first and what stays is a prefix, as engines free a
        sequence's blocks (engine.block_pool, vLLM) and as the binary search in `match` needs."""
        held = self.by_worker.get(worker)
        if held is None:
            held = self.by_worker[worker] = {}
        pop = held.pop
        for h in reversed(hashes):
            pop(h, None)
            held[h] = IN_DEVICE
        if len(held) > self.max_blocks:
            excess = len(held) - self.max_blocks + max(1, self.max_blocks // EVICT_BATCH)
            for h in list(islice(held, excess)):
                del held[h]

    def demote(self, worker: str, hashes: list[int]) -> None:
        """The worker moved these blocks to a lower tier: still held, where they were in the order."""
        held = self.by_worker.get(worker)
        if held:
            for h in hashes:
                if held.get(h):
                    held[h] = HELD

    def remove(self, worker: str, hashes: list[int]) -> None:
        """The worker evicted these blocks from every tier: held before, where they were in the order."""
        held = self.by_worker.get(worker)
        if held:
            for h in hashes:
                if h in held:
                    held[h] = 0

    def clear(self, worker: str) -> None:
        self.by_worker.pop(worker, None)

    def reset(self, worker: str, hashes: list[int]) -> None:
        self.clear(worker)
        self.add(worker, hashes)
