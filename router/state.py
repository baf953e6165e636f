"""What routers know about workers' caches and load: in this process, or in Redis for several replicas.

One call per routing decision (`view`) returns, for each candidate worker, how many leading blocks of the
prompt it holds and what is in flight on it; with Redis that is one pipelined round trip. Routing decisions
and KV events update the same state, so routers behind one Service route as one would.
"""

import time
from dataclasses import dataclass

from protocol.kv_events import KVEvent, KVEventKind
from router.prefix_index import IN_DEVICE, PrefixIndex

RECENT_BUCKET_S = 10  # recent work is counted in 10-second buckets ...
RECENT_BUCKETS = 3  # ... over the last 30 seconds


@dataclass(frozen=True, slots=True)
class WorkerView:
    matched_blocks: int
    inflight: int
    inflight_tokens: int
    recent_tokens: int = 0  # prompt tokens sent to it in the last ~30 s (cached or not)
    seen_blocks: int = 0  # leading blocks of the prompt it holds or held before (evicted since)
    recent_new: int = 0  # prompt tokens new to its cache (computed or received) in the last ~30 s
    lower_blocks: int = 0  # of matched_blocks, those in a lower tier of its cache (host memory, disk)


def _bucket(now: float | None = None) -> int:
    return int((time.time() if now is None else now) // RECENT_BUCKET_S)


class LocalState:
    def __init__(self, max_blocks_per_worker: int):
        self.index = PrefixIndex(max_blocks_per_worker)
        self.load: dict[str, list[int]] = {}
        self.recent: dict[int, dict[str, int]] = {}  # bucket -> worker -> tokens
        self.recent_new: dict[int, dict[str, int]] = {}  # bucket -> worker -> tokens new to its cache

    async def view(self, urls: list[str], hashes: list[int]) -> dict[str, WorkerView]:
        now = _bucket()
        buckets = [b for k in range(now - RECENT_BUCKETS + 1, now + 1) if (b := self.recent.get(k))]
        new = [b for k in range(now - RECENT_BUCKETS + 1, now + 1) if (b := self.recent_new.get(k))]
        index = self.index
        views = {}
        for u in urls:
            matched = index.match(u, hashes)
            views[u] = WorkerView(matched, *self.load.get(u, (0, 0)), sum(b.get(u, 0) for b in buckets),
                                  index.match_seen(u, hashes, matched), sum(b.get(u, 0) for b in new) if new else 0,
                                  matched - index.match(u, hashes, IN_DEVICE, matched) if matched else 0)
        return views

    async def record_route(self, url: str, hashes: list[int], sent_tokens: int = 0, requests: int = 0,
                           tokens: int = 0, new_tokens: int = 0) -> None:
        """The worker will hold these blocks; it is sent a prompt of `sent_tokens` (its recent work), of which
        `new_tokens` are new to its cache; and (optionally) its in-flight load grows by `requests` and `tokens`:
        one call (one Redis round trip) a routing decision."""
        self.record_route_now(url, hashes, sent_tokens, requests, tokens, new_tokens)

    def record_route_now(self, url: str, hashes: list[int], sent_tokens: int = 0, requests: int = 0,
                         tokens: int = 0, new_tokens: int = 0) -> None:
        """record_route without waiting (in memory): the router calls it once the request is on its way."""
        self.index.add(url, hashes)
        if requests or tokens:
            self.add_load_now(url, requests, tokens)
        now = _bucket()
        for counts, n in ((self.recent, sent_tokens), (self.recent_new, new_tokens)):
            if n:
                bucket = counts.setdefault(now, {})
                bucket[url] = bucket.get(url, 0) + n
                for old in [b for b in counts if b <= now - RECENT_BUCKETS]:
                    del counts[old]

    async def add_load(self, url: str, requests: int, tokens: int) -> None:
        self.add_load_now(url, requests, tokens)

    def add_load_now(self, url: str, requests: int, tokens: int) -> None:
        entry = self.load.setdefault(url, [0, 0])
        entry[0] += requests
        entry[1] += tokens

    async def apply_events(self, url: str, events: list[KVEvent]) -> None:
        for e in events:
            if e.kind is KVEventKind.STORED:
                self.index.add(url, list(e.block_hashes))
            elif e.kind is KVEventKind.OFFLOADED:
                self.index.demote(url, list(e.block_hashes))
            elif e.kind is KVEventKind.REMOVED:
                self.index.remove(url, list(e.block_hashes))
            else:
                self.index.clear(url)

    async def reset(self, url: str, hashes: list[int]) -> None:
        self.index.reset(url, hashes)

    async def owns_events(self, url: str) -> bool:
        return True

    async def lease(self, name: str, seconds: float | None = None) -> bool:
        return True  # one router: it leads

    async def share(self, name: str, values: dict[str, int], ttl_s: float) -> dict[str, int]:
        return dict(values)  # one router: its own are everyone's

    async def close(self) -> None:
        pass


class _Pending:
    """A worker's routing decisions not yet in Redis: their blocks (counted), load and recent tokens."""

    __slots__ = ("blocks", "decisions", "new_tokens", "requests", "sent_tokens", "tokens")

    def __init__(self) -> None:
        self.blocks: dict[int, int] = {}  # block -> decisions holding it
        self.decisions = self.requests = self.tokens = self.sent_tokens = self.new_tokens = 0

    def add(self, hashes: list[int], sent_tokens: int, requests: int, tokens: int, new_tokens: int,
            sign: int) -> None:
        self.decisions += sign
        self.requests += sign * requests
        self.tokens += sign * tokens
        self.sent_tokens += sign * sent_tokens
        self.new_tokens += sign * new_tokens
        blocks = self.blocks
        if sign > 0:
            for h in hashes:
                blocks[h] = blocks.get(h, 0) + 1
            return
        for h in hashes:
            if (n := blocks[h] - 1) > 0:
                blocks[h] = n
            else:
                del blocks[h]


_NONE_PENDING = _Pending()  # what `view` adds for a worker with no decision on its way (never changed)


GONE = 1e10  # a block a worker removed is scored (removal time - GONE): below every held one, trimmed first
LOWER = 5e9  # a block it moved to a lower tier, (move time - LOWER): held, below those in its device pool
_LOWER_FLOOR = -(GONE + LOWER) / 2  # scores above this are held (device: >= 0; lower tier: below 0)


class RedisState:
    """Index: a sorted set of block hashes per worker, scored by last use (trimmed to the newest N); a block the
    worker removed stays, scored below every held block (held before, as in PrefixIndex), until trimmed.
    Load: a hash of in-flight requests and tokens per worker. One router at a time (a lease) ingests a
    worker's KV events, so events are applied once and in order."""

    def __init__(self, url: str, namespace: str, max_blocks_per_worker: int, router_id: str, lease_s: float = 5.0,
                 max_connections: int = 256):
        import redis.asyncio as redis

        # A bounded pool that makes a request wait for a free connection under bursts (the default pool
        # refuses with "Too many connections" instead, which would fail requests).
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10)
        self.redis = redis.Redis(connection_pool=pool)
        self.ns = namespace
        self.max_blocks = max_blocks_per_worker
        self.router_id = router_id
        self.lease_ms = int(lease_s * 1000)
        # This router's decisions on their way to Redis, counted into its own views meanwhile: requests routed
        # in one burst (a tokenizer batch) would otherwise all see the state from before the burst.
        self._pending: dict[str, _Pending] = {}

    def _idx(self, url: str) -> str:
        return f"{self.ns}:idx:{url}"

    async def view(self, urls: list[str], hashes: list[int]) -> dict[str, WorkerView]:
        pipe = self.redis.pipeline(transaction=False)
        for u in urls:
            if hashes:
                pipe.zmscore(self._idx(u), hashes)
        pipe.hmget(f"{self.ns}:load", [f"{u}|req" for u in urls] + [f"{u}|tok" for u in urls])
        now = _bucket()
        for key in ("recent", "new"):
            for b in range(now - RECENT_BUCKETS + 1, now + 1):
                pipe.hmget(f"{self.ns}:{key}:{b}", urls)
        replies = await pipe.execute()
        recent = replies[-2 * RECENT_BUCKETS:-RECENT_BUCKETS]
        new = replies[-RECENT_BUCKETS:]
        load = replies[-2 * RECENT_BUCKETS - 1]
        views = {}
        for i, u in enumerate(urls):
            scores = replies[i] if hashes else []
            pending = self._pending.get(u, _NONE_PENDING)
            held = pending.blocks
            # A score >= 0: held in its device pool; above _LOWER_FLOOR: in a lower tier; below: held before
            # (removed); none: never held (or trimmed).
            matched = next((j for j, s in enumerate(scores)
                            if (s is None or s <= _LOWER_FLOOR) and hashes[j] not in held), len(scores))
            device = next((j for j in range(matched) if scores[j] is not None and scores[j] < 0
                           and hashes[j] not in held), matched)
            seen = next((j for j in range(matched, len(scores)) if scores[j] is None and hashes[j] not in held),
                        len(scores))
            views[u] = WorkerView(matched, int(load[i] or 0) + pending.requests,
                                  int(load[len(urls) + i] or 0) + pending.tokens,
                                  sum(int(r[i] or 0) for r in recent) + pending.sent_tokens, seen,
                                  sum(int(r[i] or 0) for r in new) + pending.new_tokens, matched - device)
        return views

    async def _add(self, pipe, url: str, hashes: list[int]) -> None:
        if hashes:
            # The first block scored most recent, the tail least: a chain is trimmed tail first and what stays
            # is a prefix (as PrefixIndex and the engines evict; `view` counts leading blocks).
            now = time.time()
            pipe.zadd(self._idx(url), {h: now - i * 1e-5 for i, h in enumerate(hashes)})
            pipe.zremrangebyrank(self._idx(url), 0, -self.max_blocks - 1)

    async def record_route(self, url: str, hashes: list[int], sent_tokens: int = 0, requests: int = 0,
                           tokens: int = 0, new_tokens: int = 0) -> None:
        pending = self._pending.get(url)
        if pending is None:
            pending = self._pending[url] = _Pending()
        pending.add(hashes, sent_tokens, requests, tokens, new_tokens, 1)  # seen by this router's views from now on
        try:
            pipe = self.redis.pipeline(transaction=False)
            await self._add(pipe, url, hashes)
            self._load(pipe, url, requests, tokens)
            for name, n in (("recent", sent_tokens), ("new", new_tokens)):
                if n:
                    key = f"{self.ns}:{name}:{_bucket()}"
                    pipe.hincrby(key, url, n)
                    pipe.expire(key, RECENT_BUCKET_S * (RECENT_BUCKETS + 1))
            await pipe.execute()
        finally:
            pending.add(hashes, sent_tokens, requests, tokens, new_tokens, -1)  # in Redis now (or failed)
            if not pending.decisions:
                del self._pending[url]

    def _load(self, pipe, url: str, requests: int, tokens: int) -> None:
        if requests:
            pipe.hincrby(f"{self.ns}:load", f"{url}|req", requests)
        if tokens:
            pipe.hincrby(f"{self.ns}:load", f"{url}|tok", tokens)

    async def add_load(self, url: str, requests: int, tokens: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self._load(pipe, url, requests, tokens)
        await pipe.execute()

    async def apply_events(self, url: str, events: list[KVEvent]) -> None:
        pipe = self.redis.pipeline(transaction=True)  # in order, all or nothing
        for e in events:
            if e.kind is KVEventKind.STORED:
                await self._add(pipe, url, list(e.block_hashes))
            elif e.kind is KVEventKind.OFFLOADED and e.block_hashes:
                pipe.zadd(self._idx(url), dict.fromkeys(e.block_hashes, time.time() - LOWER), xx=True)
            elif e.kind is KVEventKind.REMOVED and e.block_hashes:
                pipe.zadd(self._idx(url), dict.fromkeys(e.block_hashes, time.time() - GONE), xx=True)
            elif e.kind is KVEventKind.CLEARED:
                pipe.delete(self._idx(url))
        await pipe.execute()

    async def reset(self, url: str, hashes: list[int]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self._idx(url))
        await self._add(pipe, url, hashes)
        await pipe.execute()

    async def owns_events(self, url: str) -> bool:
        """Take or renew the lease on this worker's event stream; False: another router ingests it."""
        return await self.lease(f"events-owner:{url}")

    async def lease(self, name: str, seconds: float | None = None) -> bool:
        """Take or renew this router's lease on `name` (default length: the state's); False: another router
        holds it. Held until this router stops renewing it and it runs out."""
        key, ms = f"{self.ns}:{name}", self.lease_ms if seconds is None else int(seconds * 1000)
        if await self.redis.set(key, self.router_id, nx=True, px=ms):
            return True
        owner = await self.redis.get(key)
        if owner is not None and owner.decode() == self.router_id:
            await self.redis.pexpire(key, ms)
            return True
        return False

    async def share(self, name: str, values: dict[str, int], ttl_s: float) -> dict[str, int]:
        """Publish this router's counters under `name` (kept ttl_s); the sums over every router's published."""
        mine = f"{self.ns}:{name}:{self.router_id}"
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(mine, mapping=values)
        pipe.pexpire(mine, int(ttl_s * 1000))
        await pipe.execute()
        keys = [k async for k in self.redis.scan_iter(match=f"{self.ns}:{name}:*", count=1000)]
        pipe = self.redis.pipeline(transaction=False)
        for k in keys:
            pipe.hgetall(k)
        total = dict.fromkeys(values, 0)
        for got in await pipe.execute():
            for k, v in got.items():
                total[k.decode()] = total.get(k.decode(), 0) + int(v)
        return total

    async def close(self) -> None:
        await self.redis.aclose()
