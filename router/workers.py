"""The workers the router knows: their identity, health, load, and the KV events they report."""

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from protocol.kv_events import KVEvent
from protocol.messages import WorkerInfo, WorkerLoad
from protocol.stream_client import StatusError, StreamClient, StreamClientError
from router.discovery import KubernetesDiscovery, StaticDiscovery
from router.state import LocalState, RedisState

log = logging.getLogger("pdserve.router")
POLL_TIMEOUT_S = 2.0  # a worker silent this long in a health poll is unhealthy
REGISTER_TIMEOUT_S = 10.0


class RegistrationError(RuntimeError):
    """A worker disagrees with the pool (model, block size, hash seed, tokenizer)."""


@dataclass(slots=True)
class Worker:
    url: str
    role: str
    info: WorkerInfo | None = None
    healthy: bool = False
    load: WorkerLoad | None = None
    inflight: int = 0  # requests this router has sent and not seen finish (for metrics; routing reads state)
    inflight_tokens: int = 0  # prompt tokens this router sent it to compute that are not done yet
    events_seq: int = 0
    prefill_rate: float | None = None  # tokens/s it computed while busy (moving average, from /load)
    draining: bool = False  # being removed: no new requests, in-flight ones finish
    instance: str | None = None  # the worker process's identity (its KV event log's), as last seen
    restarts: int = 0  # times it came back as another instance at the same URL
    tokens_per_s: float = 0.0  # over the last health interval (dashboard)
    kv_bytes_per_s: float = 0.0
    _last_load: tuple[float, int, int] | None = None  # (time, tokens_computed, kv_bytes_sent) of the last /load


class WorkerPool:
    def __init__(self, discovery: "StaticDiscovery | KubernetesDiscovery", client: StreamClient,
                 state: "LocalState | RedisState", health_interval_s: float = 1.0,
                 on_restart: Callable[[Worker], None] = lambda w: None):
        """on_restart: a worker came back as another instance (what the router held for the old one goes)."""
        self.discovery = discovery
        self.on_restart = on_restart
        self.workers: list[Worker] = []
        self.client = client
        self.state = state
        self.health_interval_s = health_interval_s
        # Each model served, by name: its first registered worker's info (what later ones must match) and
        # tokenizer files. reference / tokenizer_files: the first model's (the default one).
        self.references: dict[str, WorkerInfo] = {}
        self.tokenizers: dict[str, dict[str, str]] = {}
        self.reference: WorkerInfo | None = None
        self.tokenizer_files: dict[str, str] | None = None
        # LoRA adapters loaded through the admin API: name -> (its model, its folder), loaded on that model's
        # workers that join later too
        self.adapter_paths: dict[str, tuple[str, str]] = {}
        self._task: asyncio.Task | None = None

    def pool(self, role: str, model: str | None = None) -> list[Worker]:
        """The workers new requests (for `model`, if given) may go to."""
        return [w for w in self.workers if w.role == role and w.healthy and not w.draining
                and (model is None or (w.info is not None and w.info.model == model))]

    def find(self, url: str) -> "Worker | None":
        return next((w for w in self.workers if w.url == url.rstrip("/")), None)

    async def sync(self) -> None:
        """Follow discovery: new workers join (registered on their first health check), gone ones leave."""
        found = await self.discovery.discover()
        wanted = {(u.rstrip("/"), "prefill") for u in found.prefill_urls}
        wanted |= {(u.rstrip("/"), "decode") for u in found.decode_urls}
        have = {(w.url, w.role) for w in self.workers}
        for w in [w for w in self.workers if (w.url, w.role) not in wanted]:
            log.info("worker %s (%s) left the pool", w.url, w.role)
            self.workers.remove(w)
            await self.state.reset(w.url, [])
        self.workers += [Worker(url, role) for url, role in sorted(wanted - have)]

    async def start(self, wait_s: float = 120.0) -> None:
        """Register the discovered workers (waiting for a static list to come up), then poll."""
        await self.sync()
        deadline = asyncio.get_running_loop().time() + wait_s
        static = isinstance(self.discovery, StaticDiscovery)
        while True:
            await asyncio.gather(*(self._refresh(w) for w in self.workers))
            if all(w.info is not None for w in self.workers) or not static:
                break
            if asyncio.get_running_loop().time() > deadline:
                missing = [w.url for w in self.workers if w.info is None]
                raise RegistrationError(f"workers did not come up: {missing}")
            await asyncio.sleep(0.5)
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.sync()
            except Exception as e:  # the Kubernetes API can be briefly unreachable; keep the last view
                log.warning("worker discovery failed: %r", e)
            await asyncio.gather(*(self._refresh(w) for w in self.workers), return_exceptions=True)

    async def _register(self, w: Worker) -> None:
        try:
            info = WorkerInfo.model_validate(await self.client.get_json(f"{w.url}/info", REGISTER_TIMEOUT_S))
        except StatusError as e:
            if e.status == 401:
                raise RegistrationError(f"{w.url} refused this router's internal token") from None
            raise
        if info.role != w.role:
            raise RegistrationError(f"{w.url} is a {info.role} worker, configured as {w.role}")
        if info.model not in self.references:  # the first worker of a model: the others must match it
            self.tokenizers[info.model] = await self.client.get_json(f"{w.url}/tokenizer", REGISTER_TIMEOUT_S)
            self.references[info.model] = info
            if self.reference is None:
                self.reference, self.tokenizer_files = info, self.tokenizers[info.model]
        ref = self.references[info.model]
        for name in ("block_size", "root_hash", "tokenizer_hash"):
            if getattr(info, name) != getattr(ref, name):
                raise RegistrationError(f"{w.url}: {name} {getattr(info, name)!r} differs from the pool's "
                                        f"{getattr(ref, name)!r}")
        w.info = info
        for name, (model, path) in self.adapter_paths.items():  # (a new or restarted worker: the admin API's)
            if model != info.model:
                continue
            try:
                await self.load_adapter(w, name, path)
            except (StreamClientError, TimeoutError) as e:
                log.error("worker %s could not load LoRA adapter %s from %s: %s", w.url, name, path, e)

    async def _refresh(self, w: Worker) -> None:
        try:
            if w.info is None:
                await self._register(w)
            w.load = WorkerLoad.model_validate(await self.client.get_json(f"{w.url}/load", POLL_TIMEOUT_S))
            self._measure_rate(w)
            await self._pull_events(w)
            if not w.healthy:
                log.info("worker %s (%s) is healthy", w.url, w.role)
            w.healthy = True
        except RegistrationError as e:
            log.error("refusing worker: %s", e)
            w.healthy = False
        except (StreamClientError, TimeoutError, ValueError) as e:
            if w.healthy:
                log.warning("worker %s is unhealthy: %r", w.url, e)
            w.healthy = False

    async def _pull_events(self, w: Worker) -> None:
        if not await self.state.owns_events(w.url):
            w.events_seq = 0  # another router ingests them; start over if this one takes over later
            return
        body = await self.client.get_json(f"{w.url}/kv_events?since={w.events_seq}", POLL_TIMEOUT_S)
        instance = body.get("instance")
        if instance != w.instance:
            if w.instance is not None:  # the same URL, another process: nothing the old one held is there
                log.warning("worker %s restarted (instance %s, was %s): its prefix index entries are dropped",
                            w.url, instance, w.instance)
                w.restarts += 1
                self.on_restart(w)
                w.info = None  # registered again on its next poll (checked against the pool as any new worker)
                await self.state.reset(w.url, [])
                if w.events_seq:  # its numbering started over: read it from the start
                    w.instance, w.events_seq = instance, 0
                    return await self._pull_events(w)
            w.instance = instance
        if body["resync"]:
            await self.state.reset(w.url, body["block_hashes"])
        await self.state.apply_events(w.url, [KVEvent.from_dict(e) for e in body["events"]])
        w.events_seq = body["seq"]

    @staticmethod
    def _measure_rate(w: Worker) -> None:
        now = time.monotonic()
        ld = w.load
        if w._last_load is not None and now > w._last_load[0]:
            dt, done = now - w._last_load[0], ld.tokens_computed - w._last_load[1]
            w.tokens_per_s = max(0, done) / dt
            w.kv_bytes_per_s = max(0, ld.kv_bytes_sent - w._last_load[2]) / dt
            if ld.running + ld.waiting > 0 and done > 0:
                rate = done / dt
                w.prefill_rate = rate if w.prefill_rate is None else 0.8 * w.prefill_rate + 0.2 * rate
        w._last_load = (now, ld.tokens_computed, ld.kv_bytes_sent)

    async def load_adapter(self, w: Worker, name: str, path: str | None) -> None:
        """Have a worker serve a LoRA adapter folder (path None: stop serving it); StatusError with its reason
        if it will not."""
        url = f"{w.url}/adapters" if path is not None else f"{w.url}/adapters/{name}/unload"
        body = json.dumps({"name": name, "path": path} if path is not None else {}).encode()
        async with self.client.post(url, body, REGISTER_TIMEOUT_S) as resp:
            answer = await resp.read()
        if resp.status != 200:
            raise StatusError(url, resp.status, answer)
        served = json.loads(answer)["adapters"]
        if w.load is not None:
            w.load = w.load.model_copy(update={"adapters": served})

    def adapters(self, model: str | None = None) -> dict[str, int]:
        """The LoRA adapters healthy workers (of `model`) serve, as of their last /load: name -> their block hash
        root."""
        served: dict[str, int] = {}
        for w in self.workers:
            if (w.healthy and w.load is not None and w.load.adapters
                    and (model is None or (w.info is not None and w.info.model == model))):
                served.update(w.load.adapters)
        return served

    def prefill_pool(self, model: str | None = None) -> list["Worker"]:
        """The workers that compute prompts: the prefill pool, or the decode pool when there is none."""
        return self.pool("prefill", model) or self.pool("decode", model)

    def predicted_ttft_s(self, queued_tokens: int, model: str | None = None) -> float | None:
        """Seconds until a new prompt's prefill could start, if the pool's measured rate holds; None: unknown."""
        rates = [w.prefill_rate for w in self.prefill_pool(model) if w.prefill_rate]
        return queued_tokens / sum(rates) if rates else None

    def mark_failed(self, w: Worker) -> None:
        """A request to this worker failed at the connection: take it out until a health check passes."""
        w.healthy = False


class ModelView:
    """One model's workers: the pool's interface, each call limited to the workers that serve `model` (what the
    dispatcher and the front door of a request for it look at)."""

    def __init__(self, pool: WorkerPool, model: str):
        self.whole, self.model = pool, model

    @property
    def reference(self) -> WorkerInfo:
        return self.whole.references[self.model]

    @property
    def tokenizer_files(self) -> dict[str, str]:
        return self.whole.tokenizers[self.model]

    def pool(self, role: str) -> list[Worker]:
        return self.whole.pool(role, self.model)

    def prefill_pool(self) -> list[Worker]:
        return self.whole.prefill_pool(self.model)

    def predicted_ttft_s(self, queued_tokens: int) -> float | None:
        return self.whole.predicted_ttft_s(queued_tokens, self.model)

    def adapters(self) -> dict[str, int]:
        return self.whole.adapters(self.model)

    def mark_failed(self, w: Worker) -> None:
        self.whole.mark_failed(w)
