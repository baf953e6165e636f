"""Run one worker process: python -m worker.serve --role decode --model PATH --port 8101 ..."""

import contextlib
import logging
import signal

import uvicorn

from engine.errors import ModelLoadError
from engine.parallel import SINGLE, Parallel
from protocol.asgi import server_options
from protocol.env_args import EnvDefaultsParser
from worker.config import WorkerConfig
from worker.runtime import WorkerRuntime


def build_app(config: WorkerConfig, parallel: Parallel = SINGLE):
    """The worker's internal API over a new runtime (rank 0's, for a tensor/expert-parallel worker)."""
    rt = WorkerRuntime(config, parallel)
    if config.role == "prefill":
        from prefill_worker.app import create_app
    else:
        from decode_worker.app import create_app
    app = create_app(rt)
    app.state.runtime = rt
    app.router.on_shutdown.append(lambda: rt.close())
    if config.internal_token:
        from protocol.internal_auth import RequireInternalToken

        app.add_middleware(RequireInternalToken, token=config.internal_token)
    return app


def build_server(config: WorkerConfig, parallel: Parallel = SINGLE, log_level: str = "warning",
                 drain_timeout_s: float = 5.0) -> uvicorn.Server:
    """The worker's HTTP server (not started): on shutdown it stops accepting connections and lets in-flight
    streams finish, up to drain_timeout_s. `server.config.app.state.runtime` is the worker's runtime."""
    return uvicorn.Server(uvicorn.Config(build_app(config, parallel), host=config.host, port=config.port,
                                         timeout_graceful_shutdown=drain_timeout_s, **server_options(log_level)))


def run(config: WorkerConfig, log_level: str = "warning", drain_timeout_s: float = 5.0) -> None:
    server = build_server(config, log_level=log_level, drain_timeout_s=drain_timeout_s)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the signal it handled on its way out
        server.run()


def main() -> None:
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
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 on a GPU, else torch's choice)")
    ap.add_argument("--drain-timeout-s", type=float, default=5.0, help="on SIGTERM, let requests finish this long")
    ap.add_argument("--internal-token", default=None,
                    help="answer only callers holding this token (default $PDSERVE_INTERNAL_TOKEN; unset: open)")
    ap.add_argument("--log-level", default="warning")
    a = ap.parse_args()
    import torch

    # On a GPU the host's torch work is small tensors: an intra-op pool of a thread a core only spins beside
    # the engine thread (a loaded decode worker on a 16-core host: 15 such threads at ~9% CPU each).
    threads = a.threads or (1 if a.device != "cpu" and torch.cuda.is_available() else None)
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM shuts down like Ctrl-C
    try:
        _run_from_args(a)
    except ModelLoadError as e:
        raise SystemExit(f"pdserve worker: {e}") from None


def _run_from_args(a) -> None:
    config = WorkerConfig(
        role=a.role, name=a.name or f"{a.role}-{a.port}", model=a.model, host=a.host, port=a.port,
        served_model_name=a.served_model_name, device=a.device, dtype=a.dtype, block_size=a.block_size,
        kv_cache_bytes=a.kv_cache_bytes, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
        gpu_memory_utilization=a.gpu_memory_utilization, transport=a.transport, load_format=a.load_format,
        attention_backend=a.attention_backend, internal_token=a.internal_token, tp_size=a.tp_size, ep_size=a.ep_size)
    if config.world_size == 1:
        run(config, a.log_level, a.drain_timeout_s)
    else:
        run_group(config, a.log_level, a.ray_address)


def run_group(config: WorkerConfig, log_level: str, ray_address: str | None) -> None:
    """A tensor/expert-parallel worker: its ranks as Ray actors (in the Ray cluster at ray_address, else a
    local one), served until SIGTERM or Ctrl-C."""
    import time

    import ray
    import torch

    from worker.ray_group import WorkerGroup

    gpus = torch.cuda.device_count() if config.device != "cpu" else 0
    if ray_address:
        ray.init(address=ray_address, logging_level=logging.WARNING)
    else:
        ray.init(num_gpus=gpus, include_dashboard=False, logging_level=logging.WARNING)
    group = WorkerGroup(config, log_level, gpus_per_rank=1.0 if gpus else 0.0)
    print(f"pdserve worker {config.name}: {config.world_size} ranks serving at {group.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        group.stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
