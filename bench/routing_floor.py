"""Routing floor: bench.routing_quality's trace replayed without timing, and how much of the hit rate it loses
is the caches' rather than the routing's.

Replays the trace in one process, one request at a time (each answered before the next is routed), to 8
in-process LRU caches like the mocks'. Placed by pdserve's policy itself (router.policy.Router; its views come
from a PrefixIndex fed by its decisions and by the caches' evictions, and a worker's recent work is the tokens
it was sent in the last `--window` requests, by default all of them: the live bench's replay is shorter than
the router's 30-s window), the same with `churn_weight` 0 (the policy's term for returning prompts off), and
by the same class's round-robin. The reference is one LRU cache of all the
workers' blocks together (8 x `--cache-blocks`): 8 caches acting as one, no prefix held twice. What the oracle
(one infinite cache) hits and that pooled cache misses is lost to capacity, whatever the routing.

With no timing, a run is exact and repeatable, so policies can be compared here over several traces
(`--seeds`) without the live bench's run-to-run spread; one trace is not enough: a small change of policy
moves one trace's hit rate by a tenth of a point either way.

`--inflight N` stands in for the live bench's concurrency: the last N decisions count as requests in flight,
each with its uncached tokens, which is the load the policy's in-flight term sees (with 64 it reproduces the live
runs at concurrency 64).

  python -m bench.routing_floor [--quick] [--cache-blocks 3000,1500] [--seeds 0,1,2,3] [--inflight N]
                                [--tokenizer-dir DIR]
"""

import argparse
from collections import OrderedDict, defaultdict, deque
from statistics import mean

from bench.common import emit
from bench.mock_server import cache_prompt
from bench.router_overhead import _demo_tokenizer
from bench.routing_quality import ORDERS, arrivals, oracle_hit_rate, prompt_blocks, trace
from router.config import CHURN_WEIGHT
from router.policy import Router
from router.prefix_index import PrefixIndex
from router.state import WorkerView
from router.workers import Worker

PLACEMENTS = ("pdserve cache_aware", "pdserve cache_aware, churn_weight 0", "round_robin")


def held_prefix(cache: OrderedDict[int, None], hashes: list[int]) -> int:
    """Leading blocks of the chain the cache holds (the mock's hits)."""
    return next((j for j, h in enumerate(hashes) if h not in cache), len(hashes))


class _Window:
    """Each worker's totals of two counts over the last `size` decisions (0: over every decision)."""

    def __init__(self, workers: int, size: int):
        self.size = size
        self.entries: deque[tuple[int, int, int]] = deque()
        self.totals = ([0] * workers, [0] * workers)

    def add(self, worker: int, first: int, second: int) -> None:
        self.totals[0][worker] += first
        self.totals[1][worker] += second
        if self.size:
            self.entries.append((worker, first, second))
            if len(self.entries) > self.size:
                j, first, second = self.entries.popleft()
                self.totals[0][j] -= first
                self.totals[1][j] -= second


def placement_router(placement: str, **overrides: float) -> Router:
    """The Router a placement names (PLACEMENTS), with any of its weights overridden."""
    kw = {"churn_weight": 0 if placement.endswith("churn_weight 0") else CHURN_WEIGHT, **overrides}
    return Router("round_robin" if placement == "round_robin" else "cache_aware", 16, **kw)


def replay(prompts: list[tuple[int, list[int]]], placement: str | Router, workers: int = 8, capacity: int = 3000,
           window: int = 0, inflight: int = 0) -> tuple[float, float]:
    """Hit rate (share of prompt tokens) and imbalance (max/mean prompt tokens a worker) of one placement.

    `inflight` > 0 emulates that many requests in flight (the live bench's concurrency): each of the last
    `inflight` decisions counts as a request and its uncached tokens in flight at its worker."""
    pool = [Worker(f"w{i}", "decode") for i in range(workers)]
    router = placement_router(placement) if isinstance(placement, str) else placement
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in pool]
    recent = _Window(workers, window)  # prompt tokens sent, and those new to the cache
    flight = _Window(workers, inflight)  # requests in flight, and their uncached tokens
    recent_tokens, recent_new = recent.totals
    flight_requests, flight_tokens = flight.totals
    sent = [0] * workers
    hits = total = 0
    index = PrefixIndex()  # as the router keeps it: fed by its decisions, corrected by evictions
    for num_tokens, hashes in prompts:
        views = {}
        for j, w in enumerate(pool):
            matched = index.match(w.url, hashes)
            views[w.url] = WorkerView(matched, flight_requests[j], flight_tokens[j], recent_tokens[j],
                                      index.match_seen(w.url, hashes, matched), recent_new[j])
        route = router.route([], pool, views, num_tokens)
        target = pool.index(route.decode)
        hits += min(16 * held_prefix(caches[target], hashes), num_tokens)
        total += num_tokens
        index.add(pool[target].url, hashes)
        index.remove(pool[target].url, cache_prompt(caches[target], hashes, capacity))
        sent[target] += num_tokens
        new = num_tokens - min(route.decode_cached_tokens, num_tokens)
        recent.add(target, num_tokens, new)
        if inflight:  # none in flight: not every decision
            flight.add(target, 1, new)
    return hits / total, max(sent) / (sum(sent) / workers)


def pooled_hit_rate(prompts: list[tuple[int, list[int]]], capacity: int) -> float:
    """The hit rate of one LRU cache of `capacity` blocks that sees every prompt."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for num_tokens, hashes in prompts:
        hits += min(16 * held_prefix(cache, hashes), num_tokens)
        total += num_tokens
        cache_prompt(cache, hashes, capacity)
    return hits / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--cache-blocks", default="3000,1500", help="comma-separated LRU capacities a worker (blocks)")
    ap.add_argument("--order", choices=ORDERS, default="arrivals")
    ap.add_argument("--window", type=int, default=0,
                    help="requests counted as a worker's recent work (0: all; the live bench's case)")
    ap.add_argument("--inflight", type=int, default=0,
                    help="requests in flight emulated: the last N decisions' requests and uncached tokens count as "
                         "the workers' in-flight load (64: the live bench at concurrency 64; 0: none)")
    ap.add_argument("--seeds", default="0,1,2,3", help="comma-separated trace seeds (bench.routing_quality --seeds)")
    ap.add_argument("--tokenizer-dir", default=None)
    a = ap.parse_args()
    tenants, users, turns, one_shots = (20, 3, 3, 60) if a.quick else (150, 6, 8, 3000)
    tok = a.tokenizer_dir or _demo_tokenizer()
    shares: dict[tuple[int, str], list[float]] = defaultdict(list)  # (capacity, placement) -> share of the oracle's
    for seed in (int(x) for x in a.seeds.split(",")):
        sessions = trace(tenants, users, turns, one_shots, seed=seed)
        prompts = prompt_blocks(sessions, arrivals(sessions, a.order, seed=seed), tok)
        oracle = oracle_hit_rate(prompts)
        for capacity in (int(c) for c in a.cache_blocks.split(",")):
            pooled = pooled_hit_rate(prompts, a.workers * capacity)
            shares[capacity, "one pooled LRU"].append(pooled / oracle)
            for placement in PLACEMENTS:
                hit_rate, imbalance = replay(prompts, placement, a.workers, capacity, a.window, a.inflight)
                shares[capacity, placement].append(hit_rate / oracle)
                emit("routing_floor", "prefix_hit_rate", hit_rate, "share", "oracle (one infinite cache)", oracle,
                     placement=placement, load_imbalance=round(imbalance, 4), cache_blocks=capacity, seed=seed,
                     order=a.order, requests=len(prompts), workers=a.workers, window=a.window,
                     inflight=a.inflight, pooled_lru=round(pooled, 4), vs_pooled_lru=round(hit_rate / pooled, 4))
    for (capacity, placement), values in shares.items():
        if placement != "one pooled LRU":
            pooled = shares[capacity, "one pooled LRU"]
            emit("routing_floor", "prefix_hit_rate_mean", mean(values), "share of the oracle's",
                 "one pooled LRU (share of the oracle's)", mean(pooled), placement=placement, cache_blocks=capacity,
                 inflight=a.inflight, seeds=len(values), share_min=round(min(values), 4),
                 share_max=round(max(values), 4), pooled_min=round(min(pooled), 4), pooled_max=round(max(pooled), 4))


if __name__ == "__main__":
    main()
