"""Prometheus metrics of the router, in its own registry."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pdserve_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=r)
        self.ttft = Histogram("pdserve_ttft_seconds", "Time to first token", buckets=_LATENCY, registry=r)
        self.itl = Histogram("pdserve_itl_seconds", "Time between tokens",
                             buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1), registry=r)
        self.e2e = Histogram("pdserve_e2e_seconds", "Request latency", buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter("pdserve_cached_prompt_tokens", "Prompt tokens served from a KV cache",
                                     registry=r)
        self.routed_cached_tokens = Counter("pdserve_routed_cached_tokens",
                                            "Prompt tokens the router expected cached", registry=r)
        self.completion_tokens = Counter("pdserve_completion_tokens", "Generated tokens", registry=r)
        self.route_latency = Histogram("pdserve_routing_decision_seconds", "Time to pick workers",
                                       buckets=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2), registry=r)
        self.worker_inflight = Gauge("pdserve_worker_inflight", "Requests in flight per worker", ["worker", "role"],
                                     registry=r)
        self.worker_free_blocks = Gauge("pdserve_worker_free_kv_blocks", "Free KV blocks per worker",
                                        ["worker", "role"], registry=r)
        self.worker_host_blocks = Gauge("pdserve_worker_host_kv_blocks", "KV blocks in each worker's host tier",
                                        ["worker", "role"], registry=r)
        self.worker_tier_hits = Gauge("pdserve_worker_kv_hit_tokens", "Prompt tokens each worker found cached, "
                                      "by the tier that held them", ["worker", "role", "tier"], registry=r)
        # Per API key (by its name: never the key itself) and model: what a bill is made of.
        self.key_requests = Counter("pdserve_key_requests", "Requests by API key name, model and outcome",
                                    ["key", "model", "outcome"], registry=r)
        self.key_tokens = Counter("pdserve_key_tokens", "Tokens by API key name, model and kind",
                                  ["key", "model", "kind"], registry=r)
        self.refused = Counter("pdserve_refused_requests", "Requests refused by admission control", ["reason"],
                               registry=r)
        self.recommended_workers = Gauge("pdserve_recommended_workers", "Workers each pool needs for the last "
                                         "minute's load (scaling advice)", ["pool"], registry=r)
        self.planner_replicas = Gauge("pdserve_planner_replicas", "Workers the SLA planner wants in each pool",
                                      ["pool"], registry=r)
        self.planner_decisions = Counter("pdserve_planner_decisions", "SLA planner resizes, by pool and direction",
                                         ["pool", "direction"], registry=r)
        self.planner_leader = Gauge("pdserve_planner_leader", "1 on the router whose SLA planner acts", registry=r)
        self.retries = Counter("pdserve_retries", "Requests retried on another worker before their first token",
                               registry=r)
        self.migrations = Counter("pdserve_migrations", "Streams moved to another decode worker after theirs failed",
                                  registry=r)
