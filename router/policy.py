"""Routing policies: which prefill and which decode worker serve a request.

cache_aware scores a worker by the prompt tokens it would have to compute (what its prefix cache lacks) plus
`load_weight` times its load (tokens and requests in flight, requests queued) plus `balance_weight` times the
request's tokens times the worker's share of the pool's recent work (prompt tokens sent it in the last ~30 s,
cached or not, over the pool's mean); the lowest cost wins, then the least recent work, then round-robin.
- load_weight (default 0.25) moves a request off the worker holding its prefix once that worker has four times
  as much queued work as the prefix saves. With mocks that compute prompts at a fixed rate, one at a time
  (bench.routing_quality --prefill-tokens-per-s 20000 or 50000, concurrency 64, five paired runs), 1.0 reached
  3.3-5.6 points less of the oracle's hit rate (requests moved off their cache: a recomputed prefix is work too,
  and a second copy of it), a worse TTFT p99 in every pair (0.6-6%) and a p50 better in two pairs, worse in
  three; 0.1-0.5 were alike; 0 doubled the p99 (no load awareness at all).
- balance_weight (default 1: a worker 10% over the mean costs 10% of the prompt more) evens out the work
  through where new prompts go, which moves no cached prompt. In-flight load alone cannot: with many requests
  in flight it is noisy, and new prompts followed the noise while tenants' traffic drifted the workers apart.
  In a quiet pool (a mean under 8 requests' worth) the excess is measured against 8 requests' worth.
- churn_weight (default 0.02): a returning prompt (a worker held its prefix before, every copy has been evicted
  since: likely to come back again) pays that times its tokens times the worker's share of the pool's recent
  prompt tokens new to its cache, so among workers about as busy it goes where the cache turns over slowest and
  will last longest; a prompt never seen goes by work alone (as likely a one-shot that only churns a cache). In
  bench.routing_floor (8 traces, no timing) it raised the hit rate in every trace: 99.18% -> 99.35% of the
  oracle at 3,000 blocks a worker and 97.39% -> 98.41% at 1,500, past one pooled LRU of all the blocks
  (99.26%, 97.42%), at imbalance 1.04-1.11; live at concurrency 1 (1,500 blocks), 97.36% -> 98.37%. At
  concurrency 64 the in-flight load term's noise decides among workers about as busy and the gain is small
  (docs/architecture.md, session 15).
- A prefix held in a worker's lower tier (host memory, disk: KV events `offloaded`) counts as cached, less
  `lower_tier_cost` (default 0.2) of its tokens: loading it back is cheaper than computing it, dearer than a
  hit in the device pool.
- A cached prefix counts only when it saves at least `min_prefix_gain` of the prompt (default 10%, and at least
  two blocks): a short prefix every prompt shares (a default system prompt) would otherwise pull all traffic to
  one worker whenever nothing is in flight, the known failure of sglang-router's tree at low concurrency.
- The load-imbalance guard: a worker that was sent more than `balance_ratio` (default 1.15) times the pool's
  mean of recent prompt tokens, and more than chance explains (three standard deviations of a count of such
  requests; never in a quiet pool), gets no credit for its cache, so the request goes where load is lowest;
  that worker then holds the prefix too, and the tenant's later requests go to the lighter of its homes. It is
  the backstop for what new prompts cannot even out: tenants that were given homes while one-shots filled the
  other workers keep those homes after the one-shots stop (bench.routing_quality --order rounds at
  concurrency 1: imbalance 1.27 without a guard).
The inputs come from the router state (`WorkerView`), so the decision is pure computation.
"""

import itertools
import math
import zlib
from dataclasses import dataclass

from router.config import BALANCE_RATIO, BALANCE_WEIGHT, CHURN_WEIGHT, LOAD_WEIGHT, LOWER_TIER_COST
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
    def __init__(self, policy: str, block_size: int, load_weight: float = LOAD_WEIGHT, local_prefill_tokens: int = 64,
                 min_prefix_gain: float = 0.1, balance_ratio: float = BALANCE_RATIO,
                 balance_weight: float = BALANCE_WEIGHT, churn_weight: float = CHURN_WEIGHT,
                 lower_tier_cost: float = LOWER_TIER_COST):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
        self.policy = policy
        self.block_size = block_size
        self.load_weight = load_weight
        self.local_prefill_tokens = local_prefill_tokens
        self.min_prefix_gain = min_prefix_gain
        self.balance_ratio = balance_ratio
        self.balance_weight = balance_weight
        self.churn_weight = churn_weight
        self.lower_tier_cost = lower_tier_cost
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
        min_gain = max(2 * self.block_size, self.min_prefix_gain * num_tokens)
        mean = sum(views[w.url].recent_tokens for w in workers) / len(workers)
        # In a quiet pool (a mean under 8 requests' worth a worker) a request more is not an imbalance.
        quiet = 8 * num_tokens
        # The guard: a worker that served more than balance_ratio times the pool's mean of recent prompt tokens
        # gets no credit for its cache, so the request goes where load is lowest. Not while the excess is within
        # chance: three standard deviations of a count of requests of this size (sqrt(mean * num_tokens)).
        ceiling = math.inf
        if mean >= quiet:
            ceiling = max(self.balance_ratio * mean, mean + 3 * math.sqrt(mean * num_tokens))
        # Evening out: a worker's excess of recent work costs that share of this request's tokens (10% over the
        # mean: 10% of the prompt). It decides where prompts no worker holds go, and so evens out the work
        # without moving any cached prompt; it moves a cached prompt only if that worker is far over the mean.
        # In a quiet pool the excess is measured against 8 requests' worth.
        spread = self.balance_weight * num_tokens / max(mean, quiet)
        # A returning prompt: a worker held its prefix before and every copy has been evicted since. It is
        # likely to come back again, so among workers about as busy it goes to the one whose cache turns over
        # slowest (the least prompt tokens new to its cache of late), where it will last longest.
        churn = 0.0
        if self.churn_weight:
            vs = [views[w.url] for w in workers]
            bs = self.block_size
            if (not any(v.matched_blocks * bs >= min_gain and v.recent_tokens <= ceiling for v in vs)
                    and any(v.seen_blocks * bs >= min_gain for v in vs)):
                churn = self.churn_weight * num_tokens / max(sum(v.recent_new for v in vs) / len(vs), quiet)

        def cost(w: Worker) -> tuple[float, int, int]:
            v = views[w.url]
            cached = v.matched_blocks * self.block_size if v.recent_tokens <= ceiling else 0
            uncached = num_tokens - (cached if cached >= min_gain else 0)
            if cached >= min_gain and v.lower_blocks:  # loading them back: cheaper than computing, not free
                uncached += self.lower_tier_cost * v.lower_blocks * self.block_size
            return (uncached + self.load_weight * self._load(w, v) + spread * v.recent_tokens + churn * v.recent_new,
                    v.recent_tokens, order[w.url])

        return min(workers, key=cost)

    def route(self, prefill: list[Worker], decode: list[Worker], views: dict[str, WorkerView], num_tokens: int,
              session: str | None = None) -> Route:
        d = self._pick(decode, views, num_tokens, session)
        d_cached = views[d.url].matched_blocks * self.block_size
        if not prefill or num_tokens - d_cached <= self.local_prefill_tokens:
            return Route(None, d, d_cached, d_cached)
        p = self._pick(prefill, views, num_tokens, session)
        return Route(p, d, d_cached, views[p.url].matched_blocks * self.block_size)
