"""The model-as-a-service front door: who may call (API keys), how much (per-key limits), whether the
cluster can take more now (admission control), and what each request cost (usage, counted once).

Order for each request: authenticate (401) -> model allowed (403) -> request limits (400) -> cluster
capacity (503, unless the request takes the place of a worse-priority one: `InFlight`) -> the key's limits
(429 with Retry-After) -> a `Ticket`, closed exactly once when the request ends, however it ends: it gives
back the unused part of the reservation and records usage.
"""

import hmac
import logging
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass

from router.config import RouterConfig
from router.errors import OpenAIError
from router.keys import ApiKey, FileKeyStore, RedisKeyStore, hash_key
from router.limits import LocalLimiter, LocalUsage, RedisLimiter, RedisUsage
from router.metrics import RouterMetrics
from router.workers import WorkerPool

log = logging.getLogger("pdserve.router")
ANONYMOUS = ApiKey("anonymous", "anonymous", "")  # auth off: usage is still counted, under this id


def parse_static_keys(spec: str | None) -> dict[str, ApiKey]:
    """PDSERVE_API_KEYS (from a Kubernetes Secret): `name:key` pairs, comma- or newline-separated."""
    keys = {}
    for item in (spec or "").replace("\n", ",").split(","):
        name, sep, key = item.strip().partition(":")
        if not item.strip():
            continue
        if not sep or not name or not key:
            raise ValueError("API keys are given as name:key pairs")
        keys[hash_key(key)] = ApiKey(f"static-{name}", name, hash_key(key))
    return keys


class InFlight:
    """This router's admitted requests by priority (lower values first). When the cluster is at capacity, a
    request is still admitted in place of an in-flight request of a worse priority that was admitted within
    capacity (the workers' schedulers run it first, preempting that one if they must): in place of the worst
    such request whose place no one took yet, so saturation refuses the worst priorities first and at most
    doubles what the cluster holds. Counted per router replica."""

    def __init__(self):
        self.plain: Counter[int] = Counter()  # priority -> requests in flight admitted within capacity
        self.taken: Counter[int] = Counter()  # priority -> of those, whose places requests past capacity took

    def place_of(self, priority: int) -> int | None:
        """The priority of the in-flight request whose place one of this priority takes past capacity; None: no
        worse request with its place free."""
        return max((p for p, n in self.plain.items() if p > priority and n > self.taken[p]), default=None)

    def enter(self, priority: int, in_place_of: int | None) -> None:
        if in_place_of is None:
            self.plain[priority] += 1
        else:
            self.taken[in_place_of] += 1

    def leave(self, priority: int, in_place_of: int | None) -> None:
        counts, key = (self.plain, priority) if in_place_of is None else (self.taken, in_place_of)
        counts[key] -= 1
        if counts[key] <= 0:
            del counts[key]


class Ticket:
    """One admitted request's reservation; `close` settles it once."""

    def __init__(self, door: "FrontDoor", key: ApiKey, rid: str, model: str, reserved: int, prompt_tokens: int,
                 priority: int = 0, in_place_of: int | None = None):
        self.door, self.key, self.rid, self.model = door, key, rid, model
        self.reserved, self.prompt_tokens = reserved, prompt_tokens
        self.priority, self.in_place_of = priority, in_place_of
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.closed = False

    async def close(self, outcome: str) -> None:
        """outcome: ok | error | cancelled."""
        if self.closed:
            return
        self.closed = True
        self.door.inflight.leave(self.priority, self.in_place_of)
        used = self.prompt_tokens + self.completion_tokens
        try:
            await self.door.limiter.finish(self.key, self.rid, self.reserved - used)
            await self.door.usage.add(self.key.id, self.model, {
                "requests": 1, "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "completion_tokens": self.completion_tokens, "errors": int(outcome == "error"),
                "cancelled": int(outcome == "cancelled")})
        except Exception as e:  # Redis unreachable: the request is over anyway; say so, do not raise
            log.error("could not settle usage of request %s: %r", self.rid, e)
        m = self.door.metrics
        m.key_requests.labels(self.key.name, self.model, outcome).inc()
        m.key_tokens.labels(self.key.name, self.model, "prompt").inc(self.prompt_tokens)
        m.key_tokens.labels(self.key.name, self.model, "completion").inc(self.completion_tokens)


@dataclass(frozen=True, slots=True)
class Capacity:
    ok: bool
    reason: str = ""  # why the cluster is full (also when a request is admitted in place of a worse one)
    in_place_of: int | None = None  # past capacity: the priority of the request it takes the place of (InFlight)


class FrontDoor:
    def __init__(self, config: RouterConfig, redis, metrics: RouterMetrics):
        self.config = config
        self.metrics = metrics
        ns = config.redis_namespace
        self.local = redis is None  # admission and settling never wait on I/O: nothing to cancel half-way
        if redis is not None:
            self.keys, self.limiter, self.usage = RedisKeyStore(redis, ns), RedisLimiter(redis, ns), RedisUsage(redis, ns)
        else:
            self.keys, self.limiter, self.usage = FileKeyStore(config.keys_file), LocalLimiter(), LocalUsage()
        self.static_keys = parse_static_keys(config.api_keys)
        self.inflight = InFlight()

    # --- who ---

    async def authenticate(self, authorization: str | None, api_key: str | None = None) -> ApiKey:
        """The key of a request: `Authorization: Bearer <key>` (OpenAI's clients), else `x-api-key: <key>`
        (Anthropic's)."""
        if not self.config.auth:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if authorization is None and api_key and api_key.strip():
            scheme, key = "bearer", api_key
        if scheme.lower() != "bearer" or not key.strip():
            raise OpenAIError(401, "missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                              code="invalid_api_key")
        key = key.strip()
        h = hash_key(key)
        record = self.static_keys.get(h) or await self.keys.lookup(h)
        if record is None:
            raise OpenAIError(401, "invalid or revoked API key", code="invalid_api_key")
        return record

    def check_admin(self, authorization: str | None) -> None:
        if not self.config.admin_token:
            raise OpenAIError(403, "the admin API is off: start the router with --admin-token", code="admin_disabled")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.config.admin_token.encode()):
            raise OpenAIError(401, "the admin API needs 'Authorization: Bearer <admin token>'",
                              code="invalid_admin_token")

    @staticmethod
    def check_model(key: ApiKey, model: str) -> None:
        if not key.allows(model):
            raise OpenAIError(403, f"this API key may not use the model {model!r}", param="model",
                              code="model_not_allowed")

    # --- how much, and whether now ---

    def check_request(self, prompt_tokens: int, max_tokens: int, chat: bool) -> None:
        c = self.config
        if c.max_prompt_tokens and prompt_tokens > c.max_prompt_tokens:
            raise OpenAIError(400, f"the prompt has {prompt_tokens} tokens; this endpoint accepts at most "
                                   f"{c.max_prompt_tokens}", param="messages" if chat else "prompt",
                              code="prompt_too_long")
        if c.max_output_tokens and max_tokens > c.max_output_tokens:
            raise OpenAIError(400, f"max_tokens {max_tokens} is over this endpoint's limit of {c.max_output_tokens}",
                              param="max_tokens", code="max_tokens_too_large")

    def capacity(self, pool: WorkerPool, inflight_prefill_tokens: int, priority: int = 0) -> Capacity:
        """Refuse new work early when the pools are saturated, unless it takes the place of in-flight work of
        a worse priority (InFlight); in-flight requests are never touched."""
        full = self._saturation(pool, inflight_prefill_tokens)
        if full is None:
            return Capacity(True)
        victim = self.inflight.place_of(priority)
        return Capacity(victim is not None, full, victim)

    def _saturation(self, pool: WorkerPool, inflight_prefill_tokens: int) -> str | None:
        """Why the cluster can take no more now; None: it can."""
        c = self.config
        decode = pool.pool("decode")
        loads = [w.load for w in decode if w.load is not None]
        if loads and c.max_waiting_per_worker and all(ld.waiting >= c.max_waiting_per_worker for ld in loads):
            return "every decode worker has a full queue"
        if loads and c.min_free_kv_ratio and all(ld.free_blocks < c.min_free_kv_ratio * ld.total_blocks
                                                 for ld in loads):
            return "every decode worker is out of KV cache"
        if c.max_queued_prefill_tokens and inflight_prefill_tokens > c.max_queued_prefill_tokens:
            return f"{inflight_prefill_tokens} prompt tokens are waiting to be prefilled"
        if c.ttft_slo_s:
            predicted = pool.predicted_ttft_s(inflight_prefill_tokens)
            if predicted is not None and predicted > c.ttft_slo_s:
                return f"the predicted time to first token is {predicted:.1f} s (SLO {c.ttft_slo_s:g} s)"
        return None

    def admit(self, key: ApiKey, rid: str, model: str, prompt_tokens: int, max_tokens: int, priority: int = 0,
              in_place_of: int | None = None) -> Awaitable[Ticket]:
        """The request's Ticket, or 429 past the key's limits. It counts as in flight from this call on (not
        from the first await: another request's capacity check may come between), so await what it returns."""
        self.inflight.enter(priority, in_place_of)
        return self._admit(key, rid, model, prompt_tokens, max_tokens, priority, in_place_of)

    async def _admit(self, key: ApiKey, rid: str, model: str, prompt_tokens: int, max_tokens: int, priority: int,
                     in_place_of: int | None) -> Ticket:
        cost = prompt_tokens + max_tokens
        try:
            refusal = await self.limiter.admit(key, rid, cost)
        except BaseException:
            self.inflight.leave(priority, in_place_of)
            raise
        if refusal is not None:
            self.inflight.leave(priority, in_place_of)
            self.metrics.key_requests.labels(key.name, model, f"limited_{refusal.reason}").inc()
            what = {"rpm": f"{key.rpm} requests a minute", "tpm": f"{key.tpm} tokens a minute",
                    "concurrent": f"{key.max_concurrent} concurrent requests"}[refusal.reason]
            if refusal.retry_after_s is None:
                raise OpenAIError(429, f"this request needs {cost} tokens (prompt + max_tokens), more than this "
                                       f"key's limit of {what}", code="rate_limit_exceeded", kind="rate_limit_exceeded")
            retry = max(1, round(refusal.retry_after_s + 0.5))
            raise OpenAIError(429, f"rate limit reached for this key: {what}; retry in {retry} s",
                              code="rate_limit_exceeded", kind="rate_limit_exceeded",
                              headers={"Retry-After": str(retry)})
        return Ticket(self, key, rid, model, cost, prompt_tokens, priority, in_place_of)

    @staticmethod
    def overloaded(reason: str) -> OpenAIError:
        return OpenAIError(503, f"the cluster is at capacity ({reason}); retry shortly", code="overloaded",
                           headers={"Retry-After": "1"})
