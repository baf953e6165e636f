"""Which worker holds which KV blocks, by chained block hash; bounded per worker by LRU.

Fed at once by the router's own decisions and corrected by the workers' KV events. Because hashes chain,
a worker holding block i's hash holds the whole prefix up to i.
"""

from collections import OrderedDict


class PrefixIndex:
    def __init__(self, max_blocks_per_worker: int = 200_000):
        self.max_blocks = max_blocks_per_worker
        self.by_worker: dict[str, OrderedDict[int, None]] = {}

    def match(self, worker: str, hashes: list[int]) -> int:
        """Number of leading blocks of this chain the worker holds."""
        held = self.by_worker.get(worker)
        if not held:
            return 0
        # Binary search: holding block i implies holding every block before it (the chain).
        lo, hi = 0, len(hashes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in held:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def add(self, worker: str, hashes: list[int]) -> None:
        held = self.by_worker.setdefault(worker, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.max_blocks:
            held.popitem(last=False)

    def remove(self, worker: str, hashes: list[int]) -> None:
        held = self.by_worker.get(worker)
        if held:
            for h in hashes:
                held.pop(h, None)

    def clear(self, worker: str) -> None:
        self.by_worker.pop(worker, None)

    def reset(self, worker: str, hashes: list[int]) -> None:
        self.clear(worker)
        self.add(worker, hashes)
