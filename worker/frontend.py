"""A worker's frontend process: its HTTP API on the worker's port, and everything per-token that must not take
the engine loop's GIL (detokenizing, stop strings, stream encoding). Rank 0's process (worker/host.py) starts
it as `python -m decode_worker` / `python -m prefill_worker --ipc-fd N`, N being its end of a socket pair to
the engine core; the role's package gives the app, this module runs it.

It exits when the core asks it to drain (once what is in flight has finished, or drain_timeout_s has
passed), on SIGTERM/SIGINT the same way, and soon after the core's process is gone (every request in
flight has then ended with an `engine_failed` error).
"""

import argparse
import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Protocol

import uvicorn

from engine.sampling_params import SamplingParams
from protocol.asgi import server_options
from protocol.messages import WireSamplingParams, WorkerInfo
from protocol.tracing import Tracer, tracer
from worker.config import WorkerConfig
from worker.engine_client import EngineClient
from worker.events import EventLog
from worker.ipc import Hello, Load, Step

log = logging.getLogger("pdserve.worker")
_EXIT_AFTER_DEATH_S = 0.5  # let the error frames of the requests in flight go out before exiting


def to_sampling_params(p: WireSamplingParams, **override) -> SamplingParams:
    """The wire's parameters, validated (RequestError) as the engine takes them."""
    fields = p.model_dump()
    fields.update(override)
    fields["stop"] = tuple(fields["stop"])
    fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
    fields["grammar"] = tuple(fields["grammar"]) if fields["grammar"] is not None else None
    fields["logit_bias"] = tuple((int(t), float(b)) for t, b in fields["logit_bias"])
    return SamplingParams(**fields)


class RoleHandler(Protocol):
    """What a role's app gives the frontend: the outputs of each step, and its requests in flight."""

    def on_step(self, step: Step) -> None: ...

    def fail_all(self, message: str) -> None: ...

    def in_flight(self) -> int: ...

    def close_streams(self) -> None: ...


class Frontend:
    def __init__(self) -> None:
        self.events = EventLog()
        self.handler: RoleHandler | None = None
        self.client: EngineClient | None = None
        self.hello: Hello | None = None
        self.server: uvicorn.Server | None = None
        self.load: Load | None = None  # the engine's counters, as of its last message
        self.adapters: dict[str, int] = {}
        self.error: str | None = None  # why the engine cannot serve (it failed, or its process is gone)
        self.draining = False
        self.tracer: Tracer | None = None  # None: tracing off
        self._tasks: set[asyncio.Task] = set()

    @property
    def config(self) -> WorkerConfig:
        return self.hello.config

    @property
    def info(self) -> WorkerInfo:
        return WorkerInfo(**self.hello.info)

    async def connect(self, sock: socket.socket) -> None:
        self.client = await EngineClient.connect(sock, self._on_step, self._on_dead, self.drain)
        self.hello = self.client.hello.result()
        self.adapters = dict(self.hello.adapters)  # LoRA adapters served: name -> block hash root
        cfg = self.hello.config
        self.tracer = tracer(f"pdserve-{cfg.role}", cfg.otlp_endpoint, cfg.trace_ratio)

    def _on_step(self, step: Step) -> None:
        if step.load is not None:
            self.load = step.load
        if step.events:
            self.events.extend(step.events)
        if self.handler is not None and (step.outs or step.refused):
            self.handler.on_step(step)

    def _on_dead(self, message: str) -> None:
        self.error = self.error or message  # the first cause (a dead rank), not its echo
        if self.handler is not None:
            self.handler.fail_all(message)
        if self.client is not None and self.client.transport is None and self.server is not None:
            # The core's process is gone: nothing can be served any more; the port is freed for a restart.
            asyncio.get_running_loop().call_later(_EXIT_AFTER_DEATH_S, self._exit)

    def _exit(self) -> None:
        if self.handler is not None:
            self.handler.close_streams()  # long-lived streams (a decode worker's channels) end now
        if self.server is not None:
            self.server.should_exit = True

    def drain(self) -> None:
        """Take no new requests, let those in flight finish (up to drain_timeout_s), then exit."""
        if self.draining:
            return
        self.draining = True
        task = asyncio.get_running_loop().create_task(self._drain())
        self._tasks.add(task)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        while self.handler is not None and self.handler.in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self._exit()


class _Server(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT draining the frontend first, and the core told once the port serves."""

    def __init__(self, config: uvicorn.Config, frontend: Frontend):
        super().__init__(config)
        self.frontend = frontend
        self.signals = 0

    def handle_exit(self, sig: int, frame) -> None:
        """The first signal drains (as the core's Drain does: a process group's SIGTERM brings both); a second
        one exits now."""
        self.signals += 1
        if self.signals == 1:
            self.frontend.drain()
        else:
            self.force_exit = self.should_exit = True

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.frontend.client.ready()


def run(make_app: Callable[[Frontend], object]) -> None:
    """The frontend process's entry point (a role package's __main__)."""
    ap = argparse.ArgumentParser(description="a pdserve worker's frontend (started by its engine core's process)")
    ap.add_argument("--ipc-fd", type=int, required=True, help="this process's end of the socket pair to the core")
    a = ap.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(_serve(socket.socket(fileno=a.ipc_fd), make_app))


async def _serve(sock: socket.socket, make_app: Callable[[Frontend], object]) -> None:
    frontend = Frontend()
    await frontend.connect(sock)
    cfg = frontend.config
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = make_app(frontend)
    if cfg.internal_token:
        from protocol.internal_auth import RequireInternalToken

        app.add_middleware(RequireInternalToken, token=cfg.internal_token)
    server = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, timeout_graceful_shutdown=cfg.drain_timeout_s,
                                    **server_options(cfg.log_level)), frontend)
    frontend.server = server
    try:
        await server.serve()
    finally:
        if frontend.tracer is not None:
            frontend.tracer.shutdown()  # the spans still buffered go out
