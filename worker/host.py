"""Rank 0's process of a worker: its engine shard, the engine core's loop (worker/engine_core.py), and the
frontend process it starts on the worker's port (worker/frontend.py), joined by a socket pair.

The frontend is started by module name (`python -m decode_worker`), so this shared package never imports
the role packages built on it. Stopping drains: the frontend takes no new requests, those in flight finish
(the core keeps stepping for them) up to drain_timeout_s, it exits, then the engine stops. Either process
dying ends the other: the frontend fails what was in flight and exits; the core stops stepping.
"""

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.parallel import SINGLE, Parallel
from engine.tokenizer_files import read_tokenizer_files, tokenizer_dir
from protocol.messages import WorkerInfo
from protocol.tokenizer import ChatTokenizer
from worker.config import WorkerConfig
from worker.engine_core import EngineCore
from worker.ipc import Hello
from worker.shard import EngineShard

log = logging.getLogger("pdserve.worker")
_ROOT = str(Path(__file__).resolve().parent.parent)  # where the role packages are, for the frontend's import


class WorkerHost:
    def __init__(self, config: WorkerConfig, parallel: Parallel = SINGLE):
        """Loads the model (this rank's shard) and registers its KV pool; start() serves it."""
        self.config = config
        self.tokenizer_files = read_tokenizer_files(tokenizer_dir(config.engine.model))
        self.shard = EngineShard(config, parallel, ChatTokenizer.from_files(self.tokenizer_files))
        engine = self.shard.engine
        self.info = WorkerInfo(
            role=config.role, name=config.name, model=engine.config.model_name, block_size=engine.config.block_size,
            root_hash=engine.root_hash, max_model_len=engine.max_model_len,
            tokenizer_hash=hashlib.sha256(json.dumps(self.tokenizer_files, sort_keys=True).encode()).hexdigest(),
        )
        ours, self._theirs = socket.socketpair()
        self.core = EngineCore(self.shard, ours)
        self.proc: subprocess.Popen | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self, timeout_s: float = 300.0) -> str:
        """Start the frontend process and the engine loop; the worker's URL once it serves."""
        fd = self._theirs.fileno()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", f"{self.config.role}_worker", "--ipc-fd", str(fd)],
                                     pass_fds=[fd], env=env)
        self._theirs.close()
        self.core.start(Hello(self.config, self.info.model_dump(), self.tokenizer_files,
                              [d.to_dict() for d in self.core.descriptors], self.shard.engine.adapter_roots()))
        deadline = time.monotonic() + timeout_s
        while not self.core.ready.wait(0.05):
            if self.proc.poll() is not None or self.core.error is not None or time.monotonic() > deadline:
                why = (f"exited with {self.proc.returncode}" if self.proc.poll() is not None
                       else self.core.error or f"did not serve within {timeout_s:g} s")
                self.stop()
                raise RuntimeError(f"worker {self.config.name}: its frontend {why}")
        log.info("worker %s serving at %s (frontend pid %d)", self.config.name, self.url, self.proc.pid)
        return self.url

    def wait(self) -> int | None:
        """Until either process ends: the frontend's exit code, or None when the engine stopped first."""
        while True:
            if self.core.wait(0.5):
                return self.proc.poll()
            if self.proc.poll() is not None:
                return self.proc.returncode

    def stop(self) -> None:
        """Drain and stop both processes' work; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.core.ask_frontend_to_exit()
            try:
                self.proc.wait(self.config.drain_timeout_s + 10)
            except subprocess.TimeoutExpired:
                log.warning("worker %s: the frontend did not exit after draining; killing it", self.config.name)
                self.proc.kill()
                self.proc.wait()
        self.core.stop()
        if self.core.error is None:
            if self.shard.engine.parallel.world_size > 1 and not self.core.running:
                self.shard.engine.drain()  # a step whose sampling waits (a grammar's) broadcasts its samples first
            self.shard.engine.runner.stop_followers()
        self.shard.close()
        self.core.conn.close()
