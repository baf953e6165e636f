"""Run the router: python -m router.main --decode http://127.0.0.1:8101 --prefill http://127.0.0.1:8102

`--processes N` runs N router processes on one port (they share the listening socket; the kernel spreads
connections); their prefix index and load live in Redis (`--redis-url`, required then), so they route as one.
The server is router/server.py (the generation endpoints straight from the socket, the rest through ASGI).
"""

import functools
import logging

from protocol.env_args import EnvDefaultsParser, env_list
from router.app import create_app
from router.config import (
    BALANCE_RATIO,
    BALANCE_WEIGHT,
    CHURN_WEIGHT,
    LOAD_WEIGHT,
    RouterConfig,
    add_planner_args,
    planner_config,
)
from router.reasoning import REASONING_PARSERS
from router.server import serve
from router.tool_parsers import PARSERS


def main() -> None:
    ap = EnvDefaultsParser(description=__doc__)
    ap.add_argument("--prefill", action="append", default=[], help="prefill worker URL (repeat)")
    ap.add_argument("--decode", action="append", default=[], help="decode worker URL (repeat)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--policy", default="cache_aware")
    ap.add_argument("--local-prefill-tokens", type=int, default=64)
    ap.add_argument("--load-weight", type=float, default=LOAD_WEIGHT,
                    help="cache_aware: what a token of in-flight work weighs against a token to recompute (the default: "
                         "best hit rate and time to first token in bench.routing_quality with queueing workers)")
    ap.add_argument("--balance-ratio", type=float, default=BALANCE_RATIO,
                    help="cache_aware's load-imbalance guard: a worker that served more than this times the pool's "
                         "mean of recent prompt tokens gets no credit for its cache ('inf': off)")
    ap.add_argument("--balance-weight", type=float, default=BALANCE_WEIGHT,
                    help="cache_aware: a worker's cost grows by this times the request's tokens times its excess "
                         "over the pool's mean of recent prompt tokens (10%% over: +10%% of the prompt), so new "
                         "prompts even out the work; 0: off")
    ap.add_argument("--churn-weight", type=float, default=CHURN_WEIGHT,
                    help="cache_aware: a prompt whose prefix was evicted from every worker that held it goes, among "
                         "workers about as busy, where the fewest recent prompt tokens were new to the cache; 0: off")
    ap.add_argument("--redis-url", default=None, help="share routing state with other routers through Redis")
    ap.add_argument("--redis-namespace", default="pdserve")
    ap.add_argument("--discovery", default="static", choices=["static", "kubernetes"])
    ap.add_argument("--k8s-namespace", default="default")
    ap.add_argument("--k8s-prefill-selector", default="app.kubernetes.io/component=prefill")
    ap.add_argument("--k8s-decode-selector", default="app.kubernetes.io/component=decode")
    ap.add_argument("--worker-port", type=int, default=8100)
    ap.add_argument("--k8s-prefill-statefulset", default=None, help="the scaling API resizes it (Kubernetes)")
    ap.add_argument("--k8s-decode-statefulset", default=None)
    ap.add_argument("--internal-token", default=None, help="the cluster's internal token for workers' API "
                    "(default $PDSERVE_INTERNAL_TOKEN)")
    ap.add_argument("--auth", type=_flag, nargs="?", const=True, default=False,
                    help="require API keys on /v1/* (on in cluster mode through the chart)")
    ap.add_argument("--admin-token", default=None, help="enables the admin API (default $PDSERVE_ADMIN_TOKEN)")
    ap.add_argument("--keys-file", default="~/.local/share/pdserve/keys.json", help="API keys without Redis")
    ap.add_argument("--api-keys", default=None, help="static name:key pairs (default $PDSERVE_API_KEYS)")
    ap.add_argument("--max-prompt-tokens", type=int, default=None)
    ap.add_argument("--max-output-tokens", type=int, default=None)
    ap.add_argument("--max-waiting-per-worker", type=int, default=256)
    ap.add_argument("--min-free-kv-ratio", type=float, default=0.0)
    ap.add_argument("--max-queued-prefill-tokens", type=int, default=2_000_000)
    ap.add_argument("--ttft-slo-s", type=float, default=None)
    ap.add_argument("--request-timeout-s", type=float, default=600.0)
    ap.add_argument("--migration-limit", type=int, default=3,
                    help="times a stream whose decode worker fails goes on from another (0: it fails instead)")
    ap.add_argument("--migration-wait-s", type=float, default=30.0,
                    help="with no decode worker to move a stream to, how long it waits for one (a restart)")
    ap.add_argument("--health-interval-s", type=float, default=1.0,
                    help="how often each worker's health, load and KV events are polled")
    ap.add_argument("--tokenize-parallel", choices=["auto", "on", "off"], default="auto",
                    help="tokenize batches with `tokenizers` off the GIL, over the cores (auto: with 4 or more)")
    ap.add_argument("--processes", type=int, default=1, help="router processes sharing the port (needs --redis-url)")
    ap.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                    help="the model's tool-call format (default: from its chat template)")
    ap.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                    help="return <think> text as reasoning_content (default: off)")
    ap.add_argument("--otlp-endpoint", default=None, help="export OpenTelemetry traces to this OTLP/HTTP collector")
    ap.add_argument("--trace-ratio", type=float, default=1.0, help="the share of requests traced")
    add_planner_args(ap, max_workers=(16, 16))
    ap.add_argument("--log-level", default="warning")
    a = ap.parse_args()
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = RouterConfig(prefill_urls=a.prefill or env_list("prefill_urls"),
                          decode_urls=a.decode or env_list("decode_urls"), host=a.host, port=a.port, policy=a.policy,
                          local_prefill_tokens=a.local_prefill_tokens, load_weight=a.load_weight,
                          balance_ratio=a.balance_ratio, balance_weight=a.balance_weight, churn_weight=a.churn_weight,
                          redis_url=a.redis_url, redis_namespace=a.redis_namespace, discovery=a.discovery,
                          k8s_namespace=a.k8s_namespace,
                          k8s_prefill_selector=a.k8s_prefill_selector, k8s_decode_selector=a.k8s_decode_selector,
                          worker_port=a.worker_port, internal_token=a.internal_token, auth=a.auth,
                          k8s_prefill_statefulset=a.k8s_prefill_statefulset,
                          k8s_decode_statefulset=a.k8s_decode_statefulset,
                          admin_token=a.admin_token, keys_file=a.keys_file, api_keys=a.api_keys,
                          max_prompt_tokens=a.max_prompt_tokens, max_output_tokens=a.max_output_tokens,
                          max_waiting_per_worker=a.max_waiting_per_worker, min_free_kv_ratio=a.min_free_kv_ratio,
                          max_queued_prefill_tokens=a.max_queued_prefill_tokens, ttft_slo_s=a.ttft_slo_s,
                          request_timeout_s=a.request_timeout_s, health_interval_s=a.health_interval_s,
                          migration_limit=a.migration_limit, migration_wait_s=a.migration_wait_s,
                          tokenize_parallel={"auto": None, "on": True, "off": False}[a.tokenize_parallel],
                          tool_call_parser=a.tool_call_parser, reasoning_parser=a.reasoning_parser,
                          otlp_endpoint=a.otlp_endpoint, trace_ratio=a.trace_ratio, **planner_config(a))
    if a.processes > 1 and not config.redis_url:
        ap.error("--processes > 1 needs --redis-url: the processes share routing state through Redis")
    serve(functools.partial(create_app, config), a.host, a.port, processes=a.processes)


def _flag(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


if __name__ == "__main__":
    main()
