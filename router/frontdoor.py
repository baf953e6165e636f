"""The model-as-a-service front door: who may call (API keys), how much (per-key limits), whether the
cluster can take more now (admission control), and what each request cost (usage, counted once).

Order for each request: authenticate (401) -> model allowed (403) -> request limits (400) -> cluster
capacity (503) -> the key's limits (429 with Retry-After) -> a `Ticket`, closed exactly once when the
request ends, however it ends: it gives back the unused part of the reservation and records usage.
"""

import hmac
import logging
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


class Ticket:
    """One admitted request's reservation; `close` settles it once."""

    def __init__(self, door: "FrontDoor", key: ApiKey, rid: str, model: str, reserved: int, prompt_tokens: int):
        self.door, self.key, self.rid, self.model = door, key, rid, model
        self.reserved, self.prompt_tokens = reserved, prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.closed = False

    async def close(self, outcome: str) -> None:
        """outcome: ok | error | cancelled."""
        if self.closed:
            return
        self.closed = True
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
    reason: str = ""


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

    def capacity(self, pool: WorkerPool, inflight_prefill_tokens: int) -> Capacity:
        """Refuse new work early when the pools are saturated; in-flight requests are never touched."""
        c = self.config
        decode = pool.pool("decode")
        loads = [w.load for w in decode if w.load is not None]
        if loads and c.max_waiting_per_worker and all(ld.waiting >= c.max_waiting_per_worker for ld in loads):
            return Capacity(False, "every decode worker has a full queue")
        if loads and c.min_free_kv_ratio and all(ld.free_blocks < c.min_free_kv_ratio * ld.total_blocks
                                                 for ld in loads):
            return Capacity(False, "every decode worker is out of KV cache")
        if c.max_queued_prefill_tokens and inflight_prefill_tokens > c.max_queued_prefill_tokens:
            return Capacity(False, f"{inflight_prefill_tokens} prompt tokens are waiting to be prefilled")
        if c.ttft_slo_s:
            predicted = pool.predicted_ttft_s(inflight_prefill_tokens)
            if predicted is not None and predicted > c.ttft_slo_s:
                return Capacity(False, f"the predicted time to first token is {predicted:.1f} s "
                                       f"(SLO {c.ttft_slo_s:g} s)")
        return Capacity(True)

    async def admit(self, key: ApiKey, rid: str, model: str, prompt_tokens: int, max_tokens: int) -> Ticket:
        cost = prompt_tokens + max_tokens
        refusal = await self.limiter.admit(key, rid, cost)
        if refusal is not None:
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
        return Ticket(self, key, rid, model, cost, prompt_tokens)

    @staticmethod
    def overloaded(reason: str) -> OpenAIError:
        return OpenAIError(503, f"the cluster is at capacity ({reason}); retry shortly", code="overloaded",
                           headers={"Retry-After": "1"})
