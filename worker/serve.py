"""Run one worker process: python -m worker.serve --role decode --model PATH --port 8101 ..."""

import argparse
import contextlib
import logging
import signal

import uvicorn

from worker.config import WorkerConfig
from worker.runtime import WorkerRuntime


def build_app(config: WorkerConfig):
    rt = WorkerRuntime(config)
    if config.role == "prefill":
        from prefill_worker.app import create_app
    else:
        from decode_worker.app import create_app
    app = create_app(rt)
    app.router.on_shutdown.append(lambda: rt.close())
    return app


def run(config: WorkerConfig, log_level: str = "warning") -> None:
    app = build_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the signal it handled on its way out
        server.run()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
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
    ap.add_argument("--transport", default="host", choices=["host"])
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--log-level", default="warning")
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM shuts down like Ctrl-C
    run(WorkerConfig(role=a.role, name=a.name or f"{a.role}-{a.port}", model=a.model, host=a.host, port=a.port,
                     served_model_name=a.served_model_name, device=a.device, dtype=a.dtype,
                     block_size=a.block_size, kv_cache_bytes=a.kv_cache_bytes, max_num_seqs=a.max_num_seqs,
                     transport=a.transport, load_format=a.load_format), a.log_level)


if __name__ == "__main__":
    main()
