"""Sending one generation to its workers: prefill and decode at once, streaming back, cancelling everywhere when
the client leaves. A request that fails before its first token is retried once elsewhere; a stream whose decode
worker fails after it goes on from another one (migrated): the request goes out again with the tokens already
delivered as outputs that the new worker computes with the prompt and continues after, so the client sees
one uninterrupted stream (token-exact for greedy and seeded sampling), up to migration_limit times. A worker
that failed the request is used again once it has restarted (another instance at its URL); with no worker to
move to, a stream waits up to MIGRATION_WAIT_S for one (a lone decode worker's restart)."""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from protocol.block_hash import hash_blocks
from protocol.messages import ChunkView, GenerateOut, ParamsOut, PrefillOut, encode_out
from protocol.stream_client import StreamClient, StreamClientError
from protocol.tracing import Tracer
from router.channels import TokenChannels
from router.errors import OpenAIError
from router.metrics import RouterMetrics
from router.policy import Router
from router.state import LocalState, RedisState
from router.workers import Worker, WorkerPool

log = logging.getLogger("pdserve.router")
_RETRYABLE = {"prefill_failed", "kv_cache_full", "engine_failed"}
MIGRATION_LIMIT = 3  # a stream's moves to another decode worker after its worker failed (Dynamo: --migration-limit)
MIGRATION_WAIT_S = 30.0  # how long a stream to be moved waits for a decode worker (one restarting) before it fails


class Dispatcher:
    def __init__(self, pool: WorkerPool, router: Router, state: LocalState | RedisState,
                 client: StreamClient, channels: TokenChannels, metrics: RouterMetrics,
                 migration_limit: int = MIGRATION_LIMIT, migration_wait_s: float = MIGRATION_WAIT_S,
                 tracer: Tracer | None = None):
        self.pool = pool
        self.router = router
        self.state = state
        self.client = client  # the data plane: requests to workers
        self.channels = channels  # and their tokens back, a frame a step from each decode worker
        self.metrics = metrics
        self.migration_limit = migration_limit
        self.migration_wait_s = migration_wait_s
        self.tracer = tracer  # None: tracing off
        self.local = isinstance(state, LocalState)  # in memory: bookkeeping never waits, so it needs no task
        self._tasks: set[asyncio.Future] = set()

    def hashes(self, prompt_ids: list[int], adapter: str | None = None) -> list[int]:
        """The prompt's block hashes, chained from the model's root (or its LoRA adapter's, as workers do)."""
        ref = self.pool.reference
        root = ref.root_hash if adapter is None else self.pool.adapters().get(adapter, ref.root_hash)
        return hash_blocks(prompt_ids, ref.block_size, root)

    async def generate(self, request_id: str, prompt_ids: list[int], params: ParamsOut,
                       hashes: list[int], session: str | None = None, span=None) -> AsyncIterator[ChunkView]:
        """The request's chunks, from the workers it is routed to (span: its trace's, when traced)."""
        bad: dict[str, str | None] = {}  # url -> the instance of the worker there that failed this request
        delivered: list[int] = []  # the tokens handed on so far: a migrated stream continues after them
        keep = self.migration_limit > 0
        started = False  # a chunk went out: from now on a failure is migrated (or ends the stream), never retried
        retried = migrations = 0
        attempt = 0
        adapter = params.adapter

        def usable(w: Worker) -> bool:  # not the worker that failed it, unless that one has restarted since
            if adapter is not None and (w.load is None or adapter not in w.load.adapters):
                return False  # (one that does not serve the request's LoRA adapter)
            return w.url not in bad or (w.instance is not None and w.instance != bad[w.url])

        while True:
            decode = [w for w in self.pool.pool("decode") if usable(w)]
            if not decode and started:  # a stream to move: wait for a worker (a lone one restarting)
                deadline = time.monotonic() + self.migration_wait_s
                while not decode and time.monotonic() < deadline:
                    await asyncio.sleep(0.25)
                    decode = [w for w in self.pool.pool("decode") if usable(w)]
            if not decode:
                if not started:
                    raise OpenAIError(503, "no healthy decode worker", code="no_healthy_worker")
                yield _failed(f"the stream's decode worker failed and no other was healthy within "
                              f"{self.migration_wait_s:g} s to continue it", "no_healthy_worker")
                return
            t0 = time.perf_counter()
            prefill = [w for w in self.pool.pool("prefill") if usable(w)]
            if delivered:
                hashes = self.hashes(prompt_ids + delivered, adapter)
            views = await self.state.view([w.url for w in prefill + decode], hashes)
            route = self.router.route(prefill, decode, views, len(prompt_ids) + len(delivered), session)
            route_s = time.perf_counter() - t0
            trace = None
            if span is not None:
                trace = self._trace_route(span, route, route_s, attempt)
            failure = None
            async for chunk in self._run(f"{request_id}-{attempt}" if attempt else request_id, prompt_ids,
                                         delivered, params, hashes, route, route_s, trace):
                if chunk.error and chunk.error.get("code") in _RETRYABLE:
                    failure = chunk
                    break
                started = True
                if keep and not chunk.finished:
                    delivered += chunk.token_ids
                yield chunk
            if failure is None:
                return
            code, message = failure.error.get("code"), failure.error.get("message")
            # A failed remote prefill is the prefill worker's fault: the decode worker stays usable.
            failed = route.prefill if code == "prefill_failed" and route.prefill else route.decode
            bad[failed.url] = failed.instance
            attempt += 1
            if not started and retried == 0:
                retried = 1
                log.warning("request %s failed before its first token (%s); retrying elsewhere", request_id, message)
                self.metrics.retries.inc()
            elif started and migrations < self.migration_limit:
                migrations += 1
                log.warning("request %s: its decode worker %s failed after %d tokens (%s); continuing the stream on "
                            "another (migration %d of %d)", request_id, route.decode.url, len(delivered), message,
                            migrations, self.migration_limit)
                self.metrics.migrations.inc()
            else:
                if started:
                    failure.error = dict(failure.error, message=f"{message} (the stream was moved {migrations} "
                                         f"times; its limit is {self.migration_limit})")
                yield failure
                return

    def _trace_route(self, span, route, route_s: float, attempt: int) -> str | None:
        """The routing decision as a span under the request's; the traceparent its workers' spans go under."""
        end = time.time()
        self.tracer.span("pdserve.route", span, end - route_s, end, **{
            "pdserve.decode_worker": route.decode.url, "pdserve.attempt": attempt,
            "pdserve.prefill_worker": route.prefill.url if route.prefill else "",
            "pdserve.cached_tokens": route.prefill_cached_tokens if route.prefill else route.decode_cached_tokens})
        return self.tracer.traceparent(span)

    async def _run(self, rid: str, prompt_ids: list[int], delivered: list[int], params: ParamsOut,
                   hashes: list[int], route, route_s: float, trace: str | None = None) -> AsyncIterator[ChunkView]:
        d, p = route.decode, route.prefill
        num_tokens = len(prompt_ids) + len(delivered)  # what the workers compute: a migrated stream's outputs too
        # The workers will hold these blocks once this runs; the one that prefills computes what it lacks.
        computed = num_tokens - (route.prefill_cached_tokens if p else route.decode_cached_tokens)
        d.inflight += 1
        d_tokens = 0 if p else computed
        d.inflight_tokens += d_tokens
        prefill_task = None
        finished = False
        recorded = False

        def sent() -> None:  # once the request is written, off the path to the worker: metrics
            self.metrics.route_latency.observe(route_s)
            self.metrics.routed_cached_tokens.inc(route.prefill_cached_tokens)

        try:
            # The decision is recorded before anything else can route: the next request must see this one's
            # blocks and load, or requests routed in one burst (a tokenizer batch) all pick the same worker.
            # A decode worker that prefills itself carries the prompt's uncached tokens as load until its first
            # token (they were carried until the request ended: a long answer kept its prompt as queued work).
            # What is new to a worker's cache (computed, or received from the prefill worker) is its churn.
            d_new = num_tokens - route.decode_cached_tokens
            if self.local:
                self.state.record_route_now(d.url, hashes, num_tokens, requests=1, tokens=d_tokens, new_tokens=d_new)
            else:
                await self.state.record_route(d.url, hashes, num_tokens, requests=1, tokens=d_tokens,
                                              new_tokens=d_new)
            recorded = True
            if p is not None:
                body = encode_out(PrefillOut(rid, prompt_ids, params, delivered, trace))
                p.inflight += 1
                p.inflight_tokens += computed
                prefill_task = asyncio.create_task(self._post_prefill(p, body))
                # Released when the prefill ends, however it ends (even cancelled before it started).
                prefill_task.add_done_callback(lambda _: self._release(p, num_tokens, computed))
                await self.state.record_route(p.url, hashes, num_tokens, requests=1, tokens=num_tokens,
                                              new_tokens=computed)
            channel = await self.channels.get(d.url)
            inbox = channel.register(rid)
            try:
                body = encode_out(GenerateOut(rid, prompt_ids, params, p.url if p else None, channel.id, delivered,
                                              trace))
                async with self.client.post(f"{d.url}/generate", body, sent=sent) as resp:
                    answer = await resp.read()
                if resp.status == 409:
                    # The worker does not know the channel (it restarted behind a connection that has not broken
                    # yet): this one is stale; the request goes out again on a new one.
                    channel.inboxes.pop(rid, None)
                    self.channels.discard(channel)
                    channel = await self.channels.get(d.url)
                    inbox = channel.register(rid)
                    body = encode_out(GenerateOut(rid, prompt_ids, params, p.url if p else None, channel.id,
                                                  delivered, trace))
                    async with self.client.post(f"{d.url}/generate", body) as resp:
                        answer = await resp.read()
                if resp.status != 200:
                    text = answer.decode(errors="replace")[:300]
                    yield _failed(f"decode worker answered {resp.status}: {text}", "engine_failed")
                    return
                while not finished:
                    chunk = await inbox.get(self.client.timeout_s)
                    if d_tokens:  # the first token: the prompt is computed; what stays in flight is decoding
                        d.inflight_tokens -= d_tokens
                        if recorded:
                            self._add_load(d.url, 0, -d_tokens)
                        d_tokens = 0
                    finished = chunk.finished
                    if chunk.error and channel.closed:  # the channel broke: the worker is gone or stuck
                        self.pool.mark_failed(d)
                    yield chunk
            finally:
                channel.inboxes.pop(rid, None)
                if not finished and not channel.closed:  # the client left: the worker frees the request now
                    self._background(self._abort(d, rid))
        except (StreamClientError, TimeoutError) as e:
            self.pool.mark_failed(d)
            yield _failed(f"lost the decode worker {d.url}: {e!r}", "engine_failed")
        finally:
            d.inflight -= 1
            d.inflight_tokens -= d_tokens
            if recorded:
                self._add_load(d.url, -1, -d_tokens)
            if prefill_task is not None and not prefill_task.done():
                prefill_task.cancel()
                self._background(self._abort(p, rid))  # frees the KV the prefill worker holds for it

    async def _post_prefill(self, p: Worker, body: bytes) -> None:
        try:
            async with self.client.post(f"{p.url}/prefill", body) as resp:
                await resp.read()
        except (StreamClientError, TimeoutError):
            self.pool.mark_failed(p)  # the decode worker's /send fails too, and the request is retried

    def _release(self, p: Worker, num_tokens: int, computed: int) -> None:
        p.inflight -= 1
        p.inflight_tokens -= computed
        self._add_load(p.url, -1, -num_tokens)

    def _add_load(self, url: str, requests: int, tokens: int) -> None:
        """From code that cannot wait (a finally, a callback): in memory at once, or to Redis in a task."""
        if self.local:
            self.state.add_load_now(url, requests, tokens)
        else:
            self._background(self.state.add_load(url, requests, tokens))

    def _background(self, coro) -> None:
        """Fire and forget, keeping a reference until done (the loop holds tasks only weakly)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _abort(self, w: Worker, rid: str) -> None:
        with contextlib.suppress(StreamClientError, TimeoutError):  # a dead worker holds nothing
            async with asyncio.timeout(2.0), self.client.post(f"{w.url}/abort/{rid}", b"{}") as resp:
                await resp.read()


def _failed(message: str, code: str) -> ChunkView:
    return ChunkView(finished=True, finish_reason="error",
                         error={"message": message, "type": "server_error", "code": code})
