"""The router process's configuration, validated once."""

from dataclasses import dataclass, field
from pathlib import Path

# cache_aware's weights, the defaults of the router's flags, RouterConfig and router.policy.Router alike
LOAD_WEIGHT = 0.25  # per token of queued work, against 1 per token to recompute (bench.routing_quality)
BALANCE_RATIO = 1.15  # the load-imbalance guard (router/policy.py); inf: off
BALANCE_WEIGHT = 1.0  # a worker's excess of recent work, in shares of the request's tokens (router/policy.py)
CHURN_WEIGHT = 0.02  # a returning prompt: a worker's share of the pool's recent new tokens, likewise
# A cached token in a lower tier (host memory) costs this share of computing it: loading it back. Llama-3-8B's
# KV is 128 KiB a token; at ~25 GB/s host-to-device that is ~5 us, against ~25 us to prefill it on an H100
# (~40k tokens/s): 0.2. To be replaced by bench.kv_tiers' GPU measurement.
LOWER_TIER_COST = 0.2


def worker_pair(value: str) -> tuple[int, int]:
    """'prefill,decode' worker counts (a flag's value)."""
    prefill, decode = (int(x) for x in value.split(","))
    return prefill, decode


def add_planner_args(ap, max_workers: tuple[int, int]) -> None:
    """The SLA planner's flags (the router's and `pdserve serve`'s)."""
    ap.add_argument("--planner", choices=["off", "dry-run", "on"], default="off",
                    help="the SLA planner: sizes the pools to the TTFT and ITL targets (dry-run: only reports)")
    ap.add_argument("--planner-profile", default=None, help="the workers' profile, from `pdserve profile`")
    ap.add_argument("--planner-interval-s", type=float, default=30.0)
    ap.add_argument("--planner-ttft-slo-s", type=float, default=2.0)
    ap.add_argument("--itl-slo-s", type=float, default=0.1, help="the ITL target of scaling advice and the planner")
    ap.add_argument("--planner-min", type=worker_pair, default=(1, 1),
                    help="prefill,decode: the fewest workers the planner keeps")
    ap.add_argument("--planner-max", type=worker_pair, default=max_workers,
                    help="prefill,decode: the most workers the planner starts")


def planner_config(a) -> dict:
    """RouterConfig's planner fields from the flags of add_planner_args."""
    return {"itl_slo_s": a.itl_slo_s, "planner": a.planner, "planner_profile": a.planner_profile,
            "planner_interval_s": a.planner_interval_s, "planner_ttft_slo_s": a.planner_ttft_slo_s,
            "planner_min_replicas": a.planner_min, "planner_max_replicas": a.planner_max}


@dataclass(frozen=True, slots=True)
class RouterConfig:
    prefill_urls: list[str] = field(default_factory=list)
    decode_urls: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "cache_aware"
    load_weight: float = LOAD_WEIGHT
    balance_ratio: float = BALANCE_RATIO
    balance_weight: float = BALANCE_WEIGHT
    churn_weight: float = CHURN_WEIGHT
    local_prefill_tokens: int = 64  # prompts with at most this many uncached tokens prefill on the decode worker
    health_interval_s: float = 1.0
    tokenize_parallel: bool | None = None  # batches off the GIL, over cores (router/tokenize.py); None: auto
    request_timeout_s: float = 600.0
    migration_limit: int = 3  # a stream whose decode worker fails goes on elsewhere at most this often (0: off)
    migration_wait_s: float = 30.0  # with no decode worker to move to, how long a stream waits for one
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
    k8s_prefill_statefulset: str | None = None  # the scaling API resizes these (Kubernetes)
    k8s_decode_statefulset: str | None = None
    internal_token: str | None = field(default=None, repr=False)  # sent to workers; never printed
    # The front door (router/frontdoor.py). Auth: on in cluster mode (the chart), off embedded.
    auth: bool = False
    admin_token: str | None = field(default=None, repr=False)  # None: the admin API is off
    keys_file: str = "~/.local/share/pdserve/keys.json"  # where keys live without Redis
    api_keys: str | None = field(default=None, repr=False)  # static name:key pairs (a Kubernetes Secret)
    max_prompt_tokens: int | None = None  # None: the model's context
    max_output_tokens: int | None = None  # cap on max_tokens; None: the model's context
    max_waiting_per_worker: int = 256  # refuse new requests when every decode worker queues this many
    min_free_kv_ratio: float = 0.0  # refuse when every decode worker has less free KV than this share
    max_queued_prefill_tokens: int = 2_000_000  # refuse when this many prompt tokens wait to be prefilled
    ttft_slo_s: float | None = None  # refuse when the predicted time to first token is over this
    itl_slo_s: float = 0.1  # scaling advice: the inter-token latency decode workers should keep
    max_pool_replicas: int = 64  # the scaling API refuses more workers a pool
    # The SLA planner (router/planner_loop.py): off, dry-run (decides and reports) or on (resizes the pools).
    planner: str = "off"
    planner_profile: str | None = None  # a worker's profile (`pdserve profile`); needed unless off
    planner_interval_s: float = 30.0
    planner_ttft_slo_s: float = 2.0  # the targets it sizes the pools for (ITL: itl_slo_s)
    planner_min_replicas: tuple[int, int] = (1, 1)  # (prefill, decode)
    planner_max_replicas: tuple[int, int] = (16, 16)
    tool_call_parser: str | None = None  # the model's tool-call format; None: from its chat template
    reasoning_parser: str | None = None  # split <think> text into reasoning_content; None: off
    otlp_endpoint: str | None = None  # OpenTelemetry traces to this OTLP/HTTP collector (protocol/tracing.py); None: off
    trace_ratio: float = 1.0  # the share of requests traced

    def __post_init__(self) -> None:
        if self.discovery not in ("static", "kubernetes"):
            raise ValueError(f"unknown discovery {self.discovery!r}: static or kubernetes")
        if self.discovery == "static" and not self.decode_urls:
            raise ValueError("the router needs at least one decode worker")
        object.__setattr__(self, "keys_file", str(Path(self.keys_file).expanduser()))
        if min(self.local_prefill_tokens, self.load_weight, self.balance_weight, self.churn_weight) < 0:
            raise ValueError("local_prefill_tokens, load_weight, balance_weight and churn_weight must be >= 0")
        if self.planner not in ("off", "dry-run", "on"):
            raise ValueError(f"unknown planner mode {self.planner!r}: off, dry-run or on")
        if self.planner != "off" and not self.planner_profile:
            raise ValueError("the planner needs a worker profile (--planner-profile, from `pdserve profile`)")
        if self.planner_interval_s <= 0 or not all(0 <= lo <= hi for lo, hi in zip(
                self.planner_min_replicas, self.planner_max_replicas, strict=True)):
            raise ValueError("the planner needs an interval > 0 and 0 <= min <= max workers a pool")
        from router.reasoning import REASONING_PARSERS
        from router.tool_parsers import PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"unknown tool-call parser {self.tool_call_parser!r}: one of {', '.join(PARSERS)}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}: one of "
                             f"{', '.join(REASONING_PARSERS)}")
        if self.migration_limit < 0 or self.migration_wait_s < 0:
            raise ValueError("migration_limit and migration_wait_s must be >= 0 (a limit of 0 turns migration off)")
        if not self.balance_ratio >= 1.0:
            raise ValueError("balance_ratio must be >= 1 (inf turns the guard off)")
