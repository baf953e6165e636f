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
    discovery: str = "static"  # static: the URLs above; kubernetes: Ready pods of the two pools
    k8s_namespace: str = "default"
    k8s_prefill_selector: str = "app.kubernetes.io/component=prefill"
    k8s_decode_selector: str = "app.kubernetes.io/component=decode"
    worker_port: int = 8100

    def __post_init__(self) -> None:
        if self.discovery not in ("static", "kubernetes"):
            raise ValueError(f"unknown discovery {self.discovery!r}: static or kubernetes")
        if self.discovery == "static" and not self.decode_urls:
            raise ValueError("the router needs at least one decode worker")
        if self.local_prefill_tokens < 0 or self.load_weight < 0:
            raise ValueError("local_prefill_tokens and load_weight must be >= 0")
