"""Per-key rate limits and usage, shared by every router replica through Redis (in-process without it).

Limits are token buckets refilled continuously: `rpm` requests and `tpm` tokens a minute, each bucket as
deep as its minute, so a key can burst its whole minute at once and then gets its rate. A request reserves
its prompt tokens plus its max output at admission; when it ends, what it did not use is given back.
Concurrent requests are a sorted set of request ids scored by an expiry, so a router that dies mid-request
cannot hold a slot forever. In Redis one Lua script checks and takes all three atomically, so routers
sharing a key's budget cannot overshoot it.

Usage: per key and model, per hour: requests, prompt, cached and completion tokens (what a bill is made of),
counted once per request whatever its end (done, failed, cancelled).
"""

import functools
import time
from dataclasses import dataclass

from router.keys import ApiKey

SLOT_TTL_S = 3600  # a concurrency slot a crashed router never released expires after this
USAGE_TTL_S = 90 * 86400

_ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local rpm, tpm, conc, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rid, ttl = ARGV[5], tonumber(ARGV[6])
local function level(cap, field)
  if cap <= 0 then return nil end
  local v = redis.call('HMGET', KEYS[1], field, field .. '_t')
  local tokens, t = tonumber(v[1]), tonumber(v[2])
  if tokens == nil then return cap end
  return math.min(cap, tokens + (now - t) * cap / 60)
end
local r, k = level(rpm, 'r'), level(tpm, 't')
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc then return {0, 1000, 'concurrent'} end
end
if r ~= nil and r < 1 then return {0, math.ceil((1 - r) * 60000 / rpm), 'rpm'} end
if k ~= nil and k < cost then
  if cost > tpm then return {0, -1, 'tpm'} end
  return {0, math.ceil((cost - k) * 60000 / tpm), 'tpm'}
end
if r ~= nil then redis.call('HSET', KEYS[1], 'r', r - 1, 'r_t', now) end
if k ~= nil then redis.call('HSET', KEYS[1], 't', k - cost, 't_t', now) end
redis.call('EXPIRE', KEYS[1], 120)
if conc > 0 then
  redis.call('ZADD', KEYS[2], now + ttl, rid)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return {1, 0, ''}
"""

_FINISH = """
local refund, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
if refund > 0 and tpm > 0 then
  local v = tonumber(redis.call('HGET', KEYS[1], 't'))
  if v ~= nil then redis.call('HSET', KEYS[1], 't', math.min(tpm, v + refund)) end
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # rpm | tpm | concurrent
    retry_after_s: float | None  # None: this request can never fit (bigger than the key's tpm)


class RedisLimiter:
    def __init__(self, redis, namespace: str):
        self.redis, self.ns = redis, namespace
        self._admit = redis.register_script(_ADMIT)
        self._finish = redis.register_script(_FINISH)

    def _keys(self, key: ApiKey) -> list[str]:
        """The key's buckets and its in-flight set, the two Redis keys both scripts touch."""
        return [f"{self.ns}:rl:{key.id}", f"{self.ns}:conc:{key.id}"]

    async def admit(self, key: ApiKey, rid: str, cost: int) -> Refusal | None:
        ok, wait_ms, why = await self._admit(
            keys=self._keys(key),
            args=[key.rpm or 0, key.tpm or 0, key.max_concurrent or 0, cost, rid, SLOT_TTL_S])
        if ok:
            return None
        why = why.decode() if isinstance(why, bytes) else why
        return Refusal(why, None if wait_ms < 0 else wait_ms / 1000)

    async def finish(self, key: ApiKey, rid: str, refund: int) -> None:
        await self._finish(keys=self._keys(key),
                           args=[rid, max(0, refund), key.tpm or 0])


class LocalLimiter:
    """The same buckets in this process (embedded mode, one router)."""

    def __init__(self) -> None:
        self.buckets: dict[tuple[str, str], tuple[float, float]] = {}  # (key id, r|t) -> (level, time)
        self.slots: dict[str, set[str]] = {}

    def _level(self, key_id: str, kind: str, cap: int, now: float) -> float:
        level, t = self.buckets.get((key_id, kind), (cap, now))
        return min(cap, level + (now - t) * cap / 60)

    async def admit(self, key: ApiKey, rid: str, cost: int) -> Refusal | None:
        now = time.monotonic()
        slots = self.slots.setdefault(key.id, set())
        if key.max_concurrent and len(slots) >= key.max_concurrent:
            return Refusal("concurrent", 1.0)
        r = self._level(key.id, "r", key.rpm, now) if key.rpm else None
        k = self._level(key.id, "t", key.tpm, now) if key.tpm else None
        if r is not None and r < 1:
            return Refusal("rpm", (1 - r) * 60 / key.rpm)
        if k is not None and k < cost:
            return Refusal("tpm", None if cost > key.tpm else (cost - k) * 60 / key.tpm)
        if r is not None:
            self.buckets[(key.id, "r")] = (r - 1, now)
        if k is not None:
            self.buckets[(key.id, "t")] = (k - cost, now)
        if key.max_concurrent:
            slots.add(rid)
        return None

    async def finish(self, key: ApiKey, rid: str, refund: int) -> None:
        self.slots.get(key.id, set()).discard(rid)
        if key.tpm and refund > 0 and (key.id, "t") in self.buckets:
            level, t = self.buckets[(key.id, "t")]
            self.buckets[(key.id, "t")] = (min(key.tpm, level + refund), t)


USAGE_FIELDS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "errors", "cancelled")


@functools.lru_cache(maxsize=4)
def _hour_of(hour: int) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(hour * 3600))


def _hour(now: float | None = None) -> str:
    """The UTC hour `now` falls in, as YYYYMMDDHH (formatted once an hour, not once a request)."""
    return _hour_of(int((now if now is not None else time.time()) // 3600))


class RedisUsage:
    def __init__(self, redis, namespace: str):
        self.redis, self.ns = redis, namespace

    async def add(self, key_id: str, model: str, counts: dict[str, int]) -> None:
        k = f"{self.ns}:usage:{_hour()}:{key_id}:{model}"
        pipe = self.redis.pipeline(transaction=True)
        for name, v in counts.items():
            if v:
                pipe.hincrby(k, name, v)
        pipe.expire(k, USAGE_TTL_S)
        await pipe.execute()

    async def report(self, key_id: str | None = None, hours: int = 24) -> list[dict]:
        rows = []
        now = time.time()
        for h in range(hours):
            hour = _hour(now - 3600 * h)
            async for k in self.redis.scan_iter(match=f"{self.ns}:usage:{hour}:{key_id or '*'}:*", count=1000):
                k = k.decode()
                kid, _, model = k[len(f"{self.ns}:usage:{hour}:"):].partition(":")
                values = {f.decode(): int(v) for f, v in (await self.redis.hgetall(k)).items()}
                rows.append({"hour": hour, "key_id": kid, "model": model,
                             **{f: values.get(f, 0) for f in USAGE_FIELDS}})
        return sorted(rows, key=lambda r: (r["hour"], r["key_id"], r["model"]))


class LocalUsage:
    """Usage in this process, kept as long as Redis keeps it (USAGE_TTL_S): older hours are dropped once an
    hour, so a long-running router does not grow without bound."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], dict[str, int]] = {}
        self._pruned_hour = ""

    async def add(self, key_id: str, model: str, counts: dict[str, int]) -> None:
        hour = _hour()
        if hour != self._pruned_hour:
            self._pruned_hour = hour
            oldest = _hour(time.time() - USAGE_TTL_S)
            for k in [k for k in self.rows if k[0] < oldest]:
                del self.rows[k]
        row = self.rows.setdefault((hour, key_id, model), dict.fromkeys(USAGE_FIELDS, 0))
        for name, v in counts.items():
            row[name] += v

    async def report(self, key_id: str | None = None, hours: int = 24) -> list[dict]:
        oldest = _hour(time.time() - 3600 * (hours - 1))
        return [{"hour": h, "key_id": k, "model": m, **row} for (h, k, m), row in sorted(self.rows.items())
                if h >= oldest and (key_id is None or k == key_id)]
