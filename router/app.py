"""The router's HTTP app: OpenAI-compatible endpoints, /health and /metrics."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protocol.http_client import data_plane_session, internal_client
from protocol.messages import GenerateChunk, TokenLogprobWire, WireSamplingParams
from protocol.tokenizer import ChatTemplateError, ChatTokenizer
from router.config import RouterConfig
from router.discovery import KubernetesDiscovery, StaticDiscovery
from router.dispatch import Dispatcher
from router.errors import OpenAIError, install_error_handlers
from router.metrics import RouterMetrics
from router.openai_format import Formatter, usage
from router.policy import Router
from router.schemas import ChatCompletionRequest, CompletionRequest
from router.state import LocalState, RedisState
from router.workers import WorkerPool

log = logging.getLogger("pdserve.router")
TOKENIZE_OFF_LOOP_CHARS = 16_000  # longer prompts are tokenized in a thread so the loop keeps serving


class RouterState:
    def __init__(self, config: RouterConfig):
        self.config = config
        self.client = internal_client(httpx.Timeout(10.0, connect=5.0))  # control plane: health, events
        self.session = None  # data plane (aiohttp), made on the server's event loop at start
        if config.redis_url:
            self.state = RedisState(config.redis_url, config.redis_namespace, config.max_index_blocks_per_worker,
                                    router_id=uuid.uuid4().hex)
        else:
            self.state = LocalState(config.max_index_blocks_per_worker)
        if config.discovery == "kubernetes":
            discovery = KubernetesDiscovery(config.k8s_namespace, config.k8s_prefill_selector,
                                            config.k8s_decode_selector, config.worker_port)
        else:
            discovery = StaticDiscovery(config.prefill_urls, config.decode_urls)
        self.pool = WorkerPool(discovery, self.client, self.state, config.health_interval_s)
        self.metrics = RouterMetrics()
        self.tokenizer: ChatTokenizer | None = None
        self.router: Router | None = None
        self.dispatcher: Dispatcher | None = None

    async def start(self) -> None:
        self.session = data_plane_session(self.config.request_timeout_s)
        await self.pool.start()

    def ready(self) -> bool:
        """The tokenizer and routing come from the first registered worker (which may come later)."""
        if self.dispatcher is None and self.pool.reference is not None:
            self.tokenizer = ChatTokenizer.from_files(self.pool.tokenizer_files)
            self.router = Router(self.config.policy, self.pool.reference.block_size, self.config.load_weight,
                                 self.config.local_prefill_tokens)
            self.dispatcher = Dispatcher(self.pool, self.router, self.state, self.session, self.metrics)
        return self.dispatcher is not None

    async def stop(self) -> None:
        await self.pool.stop()
        await self.client.aclose()
        await self.session.close()
        await self.state.close()


def create_app(config: RouterConfig) -> FastAPI:
    state = RouterState(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await state.start()
        yield
        await state.stop()

    app = FastAPI(title="pdserve router", lifespan=lifespan)
    app.state.router_state = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = bool(state.pool.pool("decode"))
        body = {"status": "ok" if ok else "unavailable",
                "workers": [{"url": w.url, "role": w.role, "healthy": w.healthy} for w in state.pool.workers]}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        for w in state.pool.workers:
            state.metrics.worker_inflight.labels(w.url, w.role).set(w.inflight)
            if w.load:
                state.metrics.worker_free_blocks.labels(w.url, w.role).set(w.load.free_blocks)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        _require_ready(state)
        ref = state.pool.reference
        return {"object": "list", "data": [{"id": ref.model, "object": "model", "created": 0,
                                            "owned_by": "pdserve", "max_model_len": ref.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        _require_ready(state)
        _check_model(state, body.model)
        try:
            messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise OpenAIError(400, str(e), param="messages") from e
        chars = sum(len(m["content"]) for m in messages)
        try:
            if chars > TOKENIZE_OFF_LOOP_CHARS:
                ids = await asyncio.to_thread(state.tokenizer.encode_chat, messages)
            else:
                ids = state.tokenizer.encode_chat(messages)
        except ChatTemplateError as e:
            raise OpenAIError(400, str(e), param="messages") from e
        return await _serve(state, body, ids, True, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _require_ready(state)
        _check_model(state, body.model)
        if isinstance(body.prompt, list):
            ids = body.prompt
            vocab = state.tokenizer.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        elif len(body.prompt) > TOKENIZE_OFF_LOOP_CHARS:
            ids = await asyncio.to_thread(state.tokenizer.encode, body.prompt)
        else:
            ids = state.tokenizer.encode(body.prompt)
        return await _serve(state, body, ids, False, request)

    return app


class BodyLimit:
    """Refuse bodies over the limit before reading them (plain ASGI: no per-request task like
    BaseHTTPMiddleware). Chunked bodies without a length are cut off while streaming in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = OpenAIError(400, f"the request body is over {self.max_bytes} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_big
            return message

        return await self.app(scope, limited_receive, send)


def _require_ready(state: RouterState) -> None:
    if not state.ready():
        raise OpenAIError(503, "no worker has registered yet", code="no_healthy_worker")


def _check_model(state: RouterState, model: str) -> None:
    if model != state.pool.reference.model:
        raise OpenAIError(404, f"the model {model!r} does not exist; this endpoint serves "
                               f"{state.pool.reference.model!r}", param="model", code="model_not_found")


def _wire_params(body: ChatCompletionRequest | CompletionRequest, max_tokens: int, seed: int | None
                 ) -> WireSamplingParams:
    return WireSamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, seed=seed, stop=body.stop, ignore_eos=body.ignore_eos,
        logprobs=body.num_logprobs(),
    )


async def _serve(state: RouterState, body: Any, ids: list[int], chat: bool, request: Request) -> Response:
    ref = state.pool.reference
    if not ids:
        raise OpenAIError(400, "the prompt is empty", param="prompt")
    room = ref.max_model_len - len(ids)
    if room < 1:
        raise OpenAIError(400, f"the prompt has {len(ids)} tokens; this model's context is {ref.max_model_len}",
                          param="messages" if chat else "prompt", code="context_length_exceeded")
    max_tokens = body.output_limit() or room
    if max_tokens > room:
        raise OpenAIError(400, f"max_tokens {max_tokens} plus the prompt's {len(ids)} tokens exceed the "
                               f"context of {ref.max_model_len}", param="max_tokens", code="context_length_exceeded")
    if not state.pool.pool("decode"):
        raise OpenAIError(503, "no healthy decode worker", code="no_healthy_worker")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    fmt = Formatter(state.tokenizer, ref.model, rid, chat)
    hashes = state.dispatcher.hashes(ids)
    session = request.headers.get(state.config.session_header) or body.user
    streams = [state.dispatcher.generate(f"{rid}-{i}", ids, _wire_params(
        body, max_tokens, None if body.seed is None else body.seed + i), hashes, session) for i in range(body.n)]
    state.metrics.prompt_tokens.inc(len(ids) * body.n)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(state, fmt, streams, len(ids), include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    start = time.perf_counter()
    results = await asyncio.gather(*(_collect(s) for s in streams))
    completion = sum(r[3] for r in results)
    cached = max(r[4] for r in results)
    _observe(state, start, completion, cached)
    state.metrics.requests.labels("chat" if chat else "completions", "200").inc()
    return JSONResponse(fmt.full([(r[0], r[1], r[2]) for r in results], usage(len(ids), completion, cached)))


async def _collect(stream: AsyncIterator[GenerateChunk]) -> tuple[str, str | None, list[TokenLogprobWire], int, int]:
    text, lps, reason, completion, cached = [], [], None, 0, 0
    async for c in stream:
        if c.error:
            raise _worker_error(c)
        text.append(c.text)
        lps += c.logprobs
        reason, completion, cached = c.finish_reason, c.completion_tokens, c.cached_tokens
    return "".join(text), reason, lps, completion, cached


def _worker_error(c: GenerateChunk) -> OpenAIError:
    code = c.error.get("code")
    status = {"invalid_request": 400, "kv_cache_full": 503}.get(code, 502)
    return OpenAIError(status, c.error.get("message", "worker error"), code=code)


def _observe(state: RouterState, start: float, completion: int, cached: int) -> None:
    state.metrics.e2e.observe(time.perf_counter() - start)
    state.metrics.completion_tokens.inc(completion)
    state.metrics.cached_tokens.inc(cached)


async def _sse(state: RouterState, fmt: Formatter, streams: list[AsyncIterator[GenerateChunk]], prompt_len: int,
               include_usage: bool) -> AsyncIterator[bytes]:
    """Merge the n choices' streams into one SSE stream; leaving early closes every worker stream."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator[GenerateChunk]) -> None:
        try:
            async for c in s:
                await queue.put((i, c))
        except OpenAIError as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    start = last = time.perf_counter()
    first_seen, offsets, completion, cached, remaining = set(), [0] * len(streams), [0] * len(streams), 0, len(streams)
    status = "200"
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            if isinstance(item, OpenAIError) or item.error:
                err = item if isinstance(item, OpenAIError) else _worker_error(item)
                status = str(err.status)
                yield f"data: {json.dumps(err.body())}\n\n".encode()
                break
            now = time.perf_counter()
            if not first_seen:
                state.metrics.ttft.observe(now - start)
            elif item.token_ids:
                state.metrics.itl.observe(now - last)
            last = now
            yield f"data: {json.dumps(fmt.chunk(i, item, i not in first_seen, offsets[i]))}\n\n".encode()
            first_seen.add(i)
            offsets[i] += len(item.text)
            completion[i], cached = item.completion_tokens, max(cached, item.cached_tokens)
        else:
            if include_usage:
                yield f"data: {json.dumps(fmt.usage_chunk(usage(prompt_len, sum(completion), cached)))}\n\n".encode()
            yield b"data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        _observe(state, start, sum(completion), cached)
        state.metrics.requests.labels("chat" if fmt.chat else "completions", status).inc()
