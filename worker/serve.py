"""Run one worker: python -m worker.serve --role decode --model PATH --port 8101 ...

The process runs the engine core (rank 0 of the worker) and starts the worker's frontend process, which
serves the port (worker/host.py). A tensor/expert-parallel worker's ranks are Ray actors instead
(worker/ray_group.py), in the Ray cluster at --ray-address or a local one.
"""

import logging
import signal
import sys

from engine.config import EngineConfig
from engine.errors import ModelLoadError
from protocol.env_args import EnvDefaultsParser, env_list
from worker.config import WorkerConfig, parse_loras


def parse_config(argv: list[str] | None = None) -> tuple[WorkerConfig, object]:
    """The worker's config from flags (defaults from PDSERVE_* variables), and the rest of the flags."""
    ap = EnvDefaultsParser(description=__doc__)
    ap.add_argument("--role", required=True, choices=["prefill", "decode"])
    ap.add_argument("--name", default=None)
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-bytes", type=int, default=None)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                    help="fp8: the KV pool in e4m3 (half a bf16 pool's bytes; peers must match)")
    ap.add_argument("--kv-host-bytes", type=int, default=0,
                    help="host tier: (pinned) host memory for KV blocks evicted from the pool, reused on a prefix hit")
    ap.add_argument("--kv-disk-dir", default=None, help="disk tier below the host tier: a directory (kept on restart)")
    ap.add_argument("--kv-disk-bytes", type=int, default=0, help="the disk tier's size (needs --kv-host-bytes)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--ep-size", type=int, default=1, help="expert-parallel groups (tp x ep ranks, as Ray actors)")
    ap.add_argument("--ray-address", default=None, help="Ray cluster for a parallel worker's ranks (default: local)")
    ap.add_argument("--transport", default="host", choices=["host", "nixl"],
                    help="host: shared memory (CPU) or CUDA IPC (GPU) on one host; nixl: NIXL/UCX (GPU, any host)")
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "flashinfer"])
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--quantization", default="auto", choices=["auto", "none", "fp8"],
                    help="fp8: linears in e4m3 (a scale a row); auto: fp8 for an FP8 checkpoint on a GPU")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 on a GPU, else torch's choice)")
    ap.add_argument("--drain-timeout-s", type=float, default=5.0, help="on SIGTERM, let requests finish this long")
    ap.add_argument("--internal-token", default=None,
                    help="answer only callers holding this token (default $PDSERVE_INTERNAL_TOKEN; unset: open)")
    ap.add_argument("--otlp-endpoint", default=None, help="export OpenTelemetry traces to this OTLP/HTTP collector")
    ap.add_argument("--trace-ratio", type=float, default=1.0, help="the share of traces sampled (the router's)")
    ap.add_argument("--max-loras", type=int, default=0,
                    help="LoRA adapters that may run in one batch (device slots); 0: serve no adapters")
    ap.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank served")
    ap.add_argument("--max-cpu-loras", type=int, default=8, help="adapters kept read in host memory")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                    help="serve this PEFT LoRA adapter folder as NAME from the start (repeatable)")
    ap.add_argument("--log-level", default="warning")
    a = ap.parse_args(argv)
    # (--lora is repeatable; from the environment, PDSERVE_LORA holds NAME=PATH entries separated by commas)
    try:
        loras = parse_loras(a.lora or env_list("lora"), a.max_loras)
    except ValueError as e:
        ap.error(str(e))
    engine = EngineConfig(
        model=a.model, served_model_name=a.served_model_name, device=a.device, dtype=a.dtype, block_size=a.block_size,
        kv_cache_bytes=a.kv_cache_bytes, kv_cache_dtype=a.kv_cache_dtype, kv_host_bytes=a.kv_host_bytes, kv_disk_dir=a.kv_disk_dir,
        kv_disk_bytes=a.kv_disk_bytes, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
        gpu_memory_utilization=a.gpu_memory_utilization, load_format=a.load_format,
        quantization=a.quantization, attention_backend=a.attention_backend, max_loras=a.max_loras,
        max_lora_rank=a.max_lora_rank, max_cpu_loras=a.max_cpu_loras)
    config = WorkerConfig(
        role=a.role, name=a.name or f"{a.role}-{a.port}", engine=engine, host=a.host, port=a.port,
        transport=a.transport, tp_size=a.tp_size, ep_size=a.ep_size, drain_timeout_s=a.drain_timeout_s,
        log_level=a.log_level, internal_token=a.internal_token, otlp_endpoint=a.otlp_endpoint,
        trace_ratio=a.trace_ratio, loras=loras)
    return config, a


def main() -> None:
    config, a = parse_config()
    import torch

    # On a GPU the host's torch work is small tensors: an intra-op pool of a thread a core only spins beside
    # the engine thread (a loaded decode worker on a 16-core host: 15 such threads at ~9% CPU each).
    threads = a.threads or (1 if a.device != "cpu" and torch.cuda.is_available() else None)
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM shuts down like Ctrl-C
    try:
        code = run(config) if config.world_size == 1 else run_group(config, a.ray_address)
    except ModelLoadError as e:
        raise SystemExit(f"pdserve worker: {e}") from None
    sys.exit(code)


def run(config: WorkerConfig) -> int:
    """A single-rank worker in this process (and its frontend's), until SIGTERM/Ctrl-C or either one ends."""
    from worker.host import WorkerHost

    host = WorkerHost(config)
    try:
        host.start()
        code = host.wait()
        if code:
            logging.getLogger("pdserve.worker").error("worker %s: the frontend exited with %s", config.name, code)
        return 1 if code or host.core.error else 0
    except KeyboardInterrupt:
        return 0
    finally:
        host.stop()


def run_group(config: WorkerConfig, ray_address: str | None) -> int:
    """A tensor/expert-parallel worker: its ranks as Ray actors, served until SIGTERM or Ctrl-C."""
    import time

    import ray
    import torch

    from worker.ray_group import WorkerGroup

    gpus = torch.cuda.device_count() if config.engine.device != "cpu" else 0
    if ray_address:
        ray.init(address=ray_address, logging_level=logging.WARNING)
    else:
        ray.init(num_gpus=gpus, include_dashboard=False, logging_level=logging.WARNING)
    group = WorkerGroup(config, gpus_per_rank=1.0 if gpus else 0.0)
    print(f"pdserve worker {config.name}: {config.world_size} ranks serving at {group.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        group.stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
