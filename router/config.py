"""The router process's configuration, validated once."""

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RouterConfig:
    prefill_urls: list[str] = field(default_factory=list)
    decode_urls: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "cache_aware"
    load_weight: float = 1.0  # tokens of queued work that weigh as much as one token to recompute
    local_prefill_tokens: int = 64  # prompts with at most this many uncached tokens prefill on the decode worker
    health_interval_s: float = 1.0
    request_timeout_s: float = 600.0
    max_body_bytes: int = 4 << 20
    max_index_blocks_per_worker: int = 200_000
    session_header: str = "x-session-id"
    redis_url: str | None = None  # shared prefix index and load for several router replicas
    redis_namespace: str = "pdserve"

    def __post_init__(self) -> None:
        if not self.decode_urls:
            raise ValueError("the router needs at least one decode worker")
        if self.local_prefill_tokens < 0 or self.load_weight < 0:
            raise ValueError("local_prefill_tokens and load_weight must be >= 0")
