"""Routing policies: which prefill and which decode worker serve a request.

cache_aware scores a worker by the prompt tokens it would have to compute (what its prefix cache lacks),
plus a weight times its load (tokens and requests in flight, requests queued), plus an optional balance
term (balance_weight, off by default): how much more than the pool's mean it computed recently, relative to
that mean, times the request's size. It keeps short shared prefixes from pulling all traffic to one worker
when nothing is in flight, but on the routing-quality trace it spread one-shots into every worker's cache
and lowered the hit rate more than it helped balance, so it stays off until tuned. The lowest cost wins,
ties go round-robin. The inputs come from the router state (`WorkerView`), so the decision is pure computation.
"""

import itertools
import zlib
from dataclasses import dataclass

from router.state import WorkerView
from router.workers import Worker

POLICIES = ("cache_aware", "round_robin", "least_loaded", "session")


@dataclass(frozen=True, slots=True)
class Route:
    prefill: Worker | None  # None: the decode worker prefills itself
    decode: Worker
    decode_cached_tokens: int
    prefill_cached_tokens: int


class Router:
    def __init__(self, policy: str, block_size: int, load_weight: float = 1.0, local_prefill_tokens: int = 64,
                 balance_weight: float = 0.0):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
        self.policy = policy
        self.block_size = block_size
        self.load_weight = load_weight
        self.local_prefill_tokens = local_prefill_tokens
        self.balance_weight = balance_weight
        self._rr = itertools.count()

    def _load(self, w: Worker, v: WorkerView) -> float:
        queued = w.load.waiting if w.load else 0
        return v.inflight_tokens + self.block_size * (v.inflight + queued)

    def _pick(self, workers: list[Worker], views: dict[str, WorkerView], num_tokens: int,
              session: str | None) -> Worker:
        n = next(self._rr)
        if self.policy == "round_robin":
            return workers[n % len(workers)]
        if self.policy == "session" and session:
            return workers[zlib.crc32(session.encode()) % len(workers)]  # stable across router replicas
        order = {w.url: (i - n) % len(workers) for i, w in enumerate(workers)}
        if self.policy == "least_loaded":
            return min(workers, key=lambda w: (self._load(w, views[w.url]), order[w.url]))

        mean_recent = sum(views[w.url].recent_tokens for w in workers) / len(workers)

        def cost(w: Worker) -> tuple[float, int]:
            v = views[w.url]
            uncached = num_tokens - v.matched_blocks * self.block_size
            excess = (v.recent_tokens - mean_recent) / mean_recent if mean_recent > 0 else 0.0
            # At most half the request's size: a prefix cached for more than that always wins.
            balance = self.balance_weight * min(max(0.0, excess), 0.5) * num_tokens
            return uncached + self.load_weight * self._load(w, v) + balance, order[w.url]

        return min(workers, key=cost)

    def route(self, prefill: list[Worker], decode: list[Worker], views: dict[str, WorkerView], num_tokens: int,
              session: str | None = None) -> Route:
        d = self._pick(decode, views, num_tokens, session)
        d_cached = views[d.url].matched_blocks * self.block_size
        if not prefill or num_tokens - d_cached <= self.local_prefill_tokens:
            return Route(None, d, d_cached, d_cached)
        p = self._pick(prefill, views, num_tokens, session)
        return Route(p, d, d_cached, views[p.url].matched_blocks * self.block_size)
