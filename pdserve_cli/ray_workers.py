"""Workers as Ray actors: each actor hosts one worker's engine and internal HTTP server."""

import asyncio
import threading
import time

import ray

from worker.config import WorkerConfig


@ray.remote(num_cpus=0, max_restarts=0)
class WorkerActor:
    def __init__(self, config: WorkerConfig, log_level: str = "warning"):
        import logging

        import uvicorn

        from worker.serve import build_app

        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.config = config
        self.server = uvicorn.Server(uvicorn.Config(build_app(config), host=config.host, port=config.port,
                                                    log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()

    def wait_ready(self, timeout_s: float = 300.0) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"worker {self.config.name} failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.config.name} did not start in {timeout_s} s")
            time.sleep(0.1)
        return f"http://{self.config.host}:{self.config.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
