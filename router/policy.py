"""Routing policies: which prefill and which decode worker serve a request.

cache_aware scores a worker by the prompt tokens it would have to compute (what its prefix cache lacks)
plus a weight times its load (tokens and requests in flight); the lowest cost wins, ties go round-robin.
"""

import itertools
from dataclasses import dataclass

from router.prefix_index import PrefixIndex
from router.workers import Worker

POLICIES = ("cache_aware", "round_robin", "least_loaded", "session")


@dataclass(frozen=True, slots=True)
class Route:
    prefill: Worker | None  # None: the decode worker prefills itself
    decode: Worker
    decode_cached_tokens: int
    prefill_cached_tokens: int


class Router:
    def __init__(self, policy: str, index: PrefixIndex, block_size: int, load_weight: float = 1.0,
                 local_prefill_tokens: int = 64):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
        self.policy = policy
        self.index = index
        self.block_size = block_size
        self.load_weight = load_weight
        self.local_prefill_tokens = local_prefill_tokens
        self._rr = itertools.count()

    def _load(self, w: Worker) -> float:
        queued = w.load.waiting if w.load else 0
        return w.inflight_tokens + self.block_size * (w.inflight + queued)

    def _pick(self, workers: list[Worker], hashes: list[int], num_tokens: int, session: str | None) -> Worker:
        n = next(self._rr)
        if self.policy == "round_robin":
            return workers[n % len(workers)]
        if self.policy == "session" and session:
            return workers[hash(session) % len(workers)]
        if self.policy == "least_loaded":
            return min(workers, key=lambda w: (self._load(w), (workers.index(w) - n) % len(workers)))

        def cost(w: Worker) -> tuple[float, int]:
            uncached = num_tokens - self.index.match(w.url, hashes) * self.block_size
            return uncached + self.load_weight * self._load(w), (workers.index(w) - n) % len(workers)

        return min(workers, key=cost)

    def route(self, prefill: list[Worker], decode: list[Worker], hashes: list[int], num_tokens: int,
              session: str | None = None) -> Route:
        d = self._pick(decode, hashes, num_tokens, session)
        d_cached = self.index.match(d.url, hashes) * self.block_size
        if not prefill or num_tokens - d_cached <= self.local_prefill_tokens:
            return Route(None, d, d_cached, d_cached)
        p = self._pick(prefill, hashes, num_tokens, session)
        return Route(p, d, d_cached, self.index.match(p.url, hashes) * self.block_size)
