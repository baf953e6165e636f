"""The router's HTTP app: OpenAI-compatible endpoints (and Anthropic's Messages API), /health and /metrics.

`RouterApp.answer` answers the generation endpoints (POST /v1/chat/completions, /v1/completions,
/v1/responses, /v1/messages) for router.server, which hands it each request whole: validate, tokenize,
route, answer or stream, without a web framework's per-request layers (middleware stack, dependency
resolution, response classes: ~0.6 ms a request on the CI machine, as much as everything else together) or
ASGI's; under a plain ASGI server `RouterApp.__call__` runs the same handler. The rest (health, metrics,
models, tokenize, the admin API, the dashboard and the OpenAPI schema) is a FastAPI app (`RouterApp.api`),
which declares the generation endpoints too, for the schema.
"""

import asyncio
import contextlib
import dataclasses
import functools
import gc
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from protocol.http_client import TOKEN_HEADER
from protocol.messages import ChunkView, LogprobView, ParamsOut
from protocol.stream_client import StreamClient
from protocol.tokenizer import ChatTemplateError, ChatTokenizer
from protocol.tracing import maybe_child, tracer
from router import messages_api, responses_api
from router.admin import admin_routes, advice, pool_view
from router.channels import TokenChannels
from router.chat_output import ChoiceReader, assemble
from router.config import RouterConfig
from router.discovery import KubernetesDiscovery, StaticDiscovery
from router.dispatch import Dispatcher
from router.errors import OpenAIError, install_error_handlers, validation_error
from router.frontdoor import ANONYMOUS, FrontDoor, Ticket
from router.messages_api import MessagesRequest
from router.metrics import RouterMetrics
from router.openai_format import Formatter, echoed_logprobs, usage
from router.policy import Router
from router.responses_api import ResponsesRequest
from router.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationRequest,
    TokenizeRequest,
    parse,
)
from router.server import Answer, header
from router.server import Request as HttpRequest
from router.state import LocalState, RedisState
from router.structured import OutputPlan, plan
from router.telemetry import Telemetry
from router.tokenize import BatchEncoder
from router.tool_parsers import parser_for_template
from router.workers import ModelView, WorkerPool

log = logging.getLogger("pdserve.router")
DASHBOARD_DIR = Path(__file__).parent / "dashboard"  # static files, shipped in the package
_encode = msgspec.json.Encoder().encode


class ModelServing:
    """What the router serves one model with: its workers (a view of the pool), its tokenizer and batch
    encoder, its tool-call format, and a dispatcher routing among its workers only."""

    def __init__(self, state: "RouterState", model: str):
        config = state.config
        self.model = model
        self.view = ModelView(state.pool, model)
        self.tokenizer = ChatTokenizer.from_files(self.view.tokenizer_files)
        self.tool_parser = config.tool_call_parser or parser_for_template(self.tokenizer.chat_template_source)
        self.encoder = BatchEncoder(self.tokenizer, parallel=config.tokenize_parallel)
        self.router = Router(config.policy, self.view.reference.block_size, config.load_weight,
                             config.local_prefill_tokens, balance_ratio=config.balance_ratio,
                             balance_weight=config.balance_weight, churn_weight=config.churn_weight)
        self.dispatcher = Dispatcher(self.view, self.router, state.state, state.stream_client, state.channels,
                                     state.metrics, config.migration_limit, config.migration_wait_s, state.tracer)

    @property
    def reference(self):
        return self.view.reference


class RouterState:
    def __init__(self, config: RouterConfig):
        self.config = config
        token = config.internal_token
        # To the workers: token streams (the data plane) and the health, load and KV-event polls.
        self.stream_client = StreamClient(config.request_timeout_s, headers={TOKEN_HEADER: token} if token else None)
        self.channels = TokenChannels(self.stream_client)
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
        self.pool = WorkerPool(discovery, self.stream_client, self.state, config.health_interval_s,
                               on_restart=lambda w: self.channels.drop(w.url))
        self.metrics = RouterMetrics()
        self.door = FrontDoor(config, getattr(self.state, "redis", None), self.metrics)
        self.telemetry = Telemetry()
        self.tracer = tracer("pdserve-router", config.otlp_endpoint, config.trace_ratio)  # None: tracing off
        self.scaler = None  # set by whoever can add and remove workers (pdserve serve: Ray; Kubernetes)
        if config.discovery == "kubernetes" and config.k8s_decode_statefulset:
            from router.scaling import KubernetesScaler

            self.scaler = KubernetesScaler(config.k8s_namespace, {"prefill": config.k8s_prefill_statefulset,
                                                                  "decode": config.k8s_decode_statefulset})
        # Each model served (its workers registered with its name), the first one's also as `default`: its
        # tokenizer, encoder, tool-call format and dispatcher are the state's own (the default model's).
        self.models: dict[str, ModelServing] = {}
        self.default: ModelServing | None = None
        self.tokenizer: ChatTokenizer | None = None
        self.tool_parser: str | None = None  # the tool-call format of the model's outputs (router/tool_parsers.py)
        self.encoder: BatchEncoder | None = None
        self.dispatcher: Dispatcher | None = None
        self.planner = None  # the SLA planner's loop (router/planner_loop.py), made at start (the scaler is set then)

    def count(self, endpoint: str, status: str, completion_tokens: int = 0, error: OpenAIError | None = None) -> None:
        """One finished request: Prometheus and the dashboard's telemetry."""
        self.metrics.requests.labels(endpoint, status).inc()
        self.telemetry.request(status, completion_tokens)
        if error is not None:
            self.telemetry.error(error.status, error.code, error.message)

    async def start(self) -> None:
        await self.pool.start()
        self.ready()  # tokenizer and routing built now, not on the first request (~0.1 s it would wait)
        if self.scaler is not None:
            self.scaler.start()
        if self.config.planner != "off":
            self.planner = _planner_loop(self)
            self.planner.start()
        gc.freeze()  # what start-up built lives forever: keep it out of the collector's full passes

    def ready(self) -> bool:
        """A model's tokenizer and routing come from its first registered worker (which may come later)."""
        if len(self.models) < len(self.pool.references):
            for model in self.pool.references:
                if model not in self.models:
                    self.models[model] = ModelServing(self, model)
            if self.default is None:
                d = self.default = self.models[self.pool.reference.model]
                self.tokenizer, self.tool_parser, self.encoder, self.dispatcher = (d.tokenizer, d.tool_parser,
                                                                                  d.encoder, d.dispatcher)
        return self.default is not None

    async def stop(self) -> None:
        if self.planner is not None:
            await self.planner.stop()
        await self.pool.stop()
        await self.channels.close()
        await self.stream_client.close()
        await self.state.close()
        for m in self.models.values():
            m.encoder.close()
        if self.tracer is not None:
            self.tracer.shutdown()


def _planner_view(state: RouterState) -> dict | None:
    """What the dashboard shows of the planner: its mode, whether this router leads, its profile and its
    recent decisions with their reasons (None: off)."""
    p = state.planner
    if p is None:
        return None
    prof = p.planner.profile
    mode = "report only" if p.dry_run and state.config.planner == "on" else state.config.planner  # (no scaler)
    return {"mode": mode,
            "leading": p.leading, "interval_s": p.interval_s,
            "targets": {"ttft_s": p.planner.config.ttft_slo_s, "itl_s": p.planner.config.itl_slo_s},
            "profile": {"model": prof.model, "worker": prof.worker, "prefill": prof.prefill, "decode": prof.decode},
            "demand": dataclasses.asdict(state.telemetry.demand), "decisions": list(p.decisions)[-20:]}


def _planner_loop(state: RouterState):
    from router.planner import Planner, PlannerConfig, Profile
    from router.planner_loop import PlannerLoop

    c = state.config
    config = PlannerConfig(ttft_slo_s=c.planner_ttft_slo_s, itl_slo_s=c.itl_slo_s, interval_s=c.planner_interval_s,
                           min_replicas=dict(zip(("prefill", "decode"), c.planner_min_replicas, strict=True)),
                           max_replicas=dict(zip(("prefill", "decode"), c.planner_max_replicas, strict=True)))
    if state.scaler is None and c.planner == "on":
        log.warning("planner: no scaler (Kubernetes StatefulSets or pdserve serve): it only reports")
    return PlannerLoop(Planner(Profile.load(c.planner_profile), config), state.state, state.telemetry, state.pool,
                       state.metrics, state.scaler, dry_run=c.planner == "dry-run")


@dataclass(slots=True)
class Reply:
    """What a generation endpoint answers: a JSON body, or a byte stream (SSE)."""

    body: dict | None = None
    stream: AsyncIterator[Any] | None = None
    ticket: Ticket | None = None  # a stream settles it when it ends; if it never starts, RouterApp does
    completion_tokens: int = 0  # a body's
    on_close: Callable[[], None] | None = None  # once a stream's answer is over, however it ended (traces)


_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A generation endpoint: its name (the metrics' label), how its body is read, how it is answered, and
    its error bodies' shape."""

    name: str
    parse: Callable[[bytes], Any]
    run: Callable[..., Awaitable[Reply]]  # (state, body, session header, key, admitted)
    error_body: Callable[[OpenAIError], dict] = OpenAIError.body


class RouterApp:
    """The router. Its generation endpoints (`native`: path -> handler(request, body) -> Answer) are answered
    by one function, `answer`, whichever server carries the request: router.server calls the handler
    straight from the socket; as an ASGI app (`__call__`) the same handler runs, and everything else goes to
    `self.api` (FastAPI: health, metrics, models, tokenize, the admin API, the dashboard, and the OpenAPI
    schema, which documents the generation endpoints too)."""

    def __init__(self, config: RouterConfig):
        self.state = RouterState(config)
        self.api = _api(self.state)
        endpoints = {b"/v1/chat/completions": Endpoint("chat", functools.partial(_parse, True),
                                                       functools.partial(_run_openai, True)),
                     b"/v1/completions": Endpoint("completions", functools.partial(_parse, False),
                                                  functools.partial(_run_openai, False)),
                     b"/v1/responses": Endpoint("responses", functools.partial(_validated, ResponsesRequest),
                                                functools.partial(_run_translated, responses_api, "resp_",
                                                                  "responses")),
                     b"/v1/messages": Endpoint("messages", functools.partial(_validated, MessagesRequest),
                                               functools.partial(_run_translated, messages_api, "msg_", "messages"),
                                               _anthropic_error)}
        self.native = {path: functools.partial(self.answer, e) for path, e in endpoints.items()}
        self._session_header = config.session_header.lower().encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            root = scope.get("root_path", "")
            handler = self.native.get((path[len(root):] if root and path.startswith(root) else path).encode())
            if handler is not None:
                return await _asgi_answer(handler, self.state.config.max_body_bytes, scope, receive, send)
        return await self.api(scope, receive, send)

    @staticmethod
    def too_large(max_bytes: int) -> OpenAIError:
        return _too_large(max_bytes)

    async def answer(self, endpoint: Endpoint, req: HttpRequest, raw: bytes) -> Answer:
        """One generation request, whole (headers and body): the answer, or the error answer. A client that
        leaves cancels the task running this (counted as 499, its usage settled). Streams count their own
        outcome (in `_sse`); the rest is counted here."""
        count = self.state.count
        name = endpoint.name
        door = self.state.door
        key = body = lookup = None
        admitted: list[Ticket] = []
        try:
            credentials = req.header(b"authorization"), req.header(b"x-api-key")
            if door.local:  # in memory: never suspends, so a client leaving cannot interrupt it
                key = await door.authenticate(*credentials)
            else:  # in Redis: finished even if the client leaves meanwhile, to know whose bill the request is on
                lookup = asyncio.ensure_future(door.authenticate(*credentials))
                key = await asyncio.shield(lookup)
            body = endpoint.parse(raw)
            limit = self.state.config.request_timeout_s
            with _Deadline(limit) as deadline:
                try:
                    reply = await endpoint.run(self.state, body, req.header(self._session_header), key, admitted)
                except asyncio.CancelledError:
                    if not deadline.expired():
                        raise
                    raise OpenAIError(504, f"the request took longer than {limit:g} s",
                                      code="request_timeout") from None
        except OpenAIError as e:
            count(name, str(e.status), error=e)
            extra = [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
            return Answer(e.status, _encode(endpoint.error_body(e)), [_JSON, *extra])
        except asyncio.CancelledError:  # the client left; handle() freed what it held
            count(name, "499")
            if key is None and lookup is not None:
                with contextlib.suppress(Exception):  # a refused key: nobody's bill
                    key = await lookup
            if key is not None and not admitted:  # before admission: still one request on its bill, no tokens
                await door.usage.add(key.id, getattr(body, "model", "-"), {"requests": 1, "cancelled": 1})
            raise
        except Exception as e:  # noqa: BLE001 - a bug must still answer in the endpoint's error shape
            log.error("unexpected error", exc_info=e)
            error = OpenAIError(500, f"internal error: {type(e).__name__}")
            count(name, "500", error=error)
            return Answer(500, _encode(endpoint.error_body(error)), [_JSON])
        if reply.stream is None:
            count(name, "200", reply.completion_tokens)
            return Answer(200, _encode(reply.body), [_JSON])
        ticket = reply.ticket

        async def unstarted() -> None:  # the client left before the stream began: what `_sse` would have done
            if reply.on_close is not None:
                reply.on_close()
            if not ticket.closed:
                count(name, "499")
                await ticket.close("cancelled")

        return Answer(200, headers=_SSE_HEADERS, stream=reply.stream, on_close=unstarted)


async def _asgi_answer(handler: Callable, max_body_bytes: int, scope: dict, receive: Callable,
                       send: Callable) -> None:
    """A generation request under an ASGI server: the body read (within the limit), the same handler as
    router.server's, and its Answer sent; a client that leaves mid-stream stops the stream."""
    if _declared_over(scope, max_body_bytes):
        answer = Answer(400, _encode(_too_large(max_body_bytes).body()), [_JSON])
    else:
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            more = message.get("more_body", False)
            if size > max_body_bytes:
                break
        if size > max_body_bytes:
            answer = Answer(400, _encode(_too_large(max_body_bytes).body()), [_JSON])
        else:
            req = HttpRequest(method="POST", url=scope["path"].encode(), headers=list(scope["headers"]))
            answer = await handler(req, b"".join(parts))
    await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
    if answer.stream is None:
        await send({"type": "http.response.body", "body": answer.body})
        return
    stream = answer.stream

    async def pump() -> None:
        async for data in stream:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    pumping, watching = asyncio.ensure_future(pump()), asyncio.ensure_future(disconnected())
    try:
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping
    finally:
        try:
            await stream.aclose()
        finally:
            if answer.on_close is not None:
                await answer.on_close()


_JSON = (b"content-type", b"application/json")


class _Deadline:
    """Cancel the current task after `seconds`: asyncio.timeout's job, with a bare timer handle (~1 against
    ~6 us of overhead on the CI machine). In the task's `except CancelledError`, `expired()` tells the
    deadline's cancellation from any other; leaving the block takes the deadline's cancellation back, as
    asyncio.timeout does."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._fired = False

    def __enter__(self) -> "_Deadline":
        self._task = asyncio.current_task()
        self._timer = asyncio.get_running_loop().call_later(self.seconds, self._fire)
        return self

    def _fire(self) -> None:
        self._fired = True
        self._task.cancel()

    def expired(self) -> bool:
        return self._fired

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        if self._fired:
            self._task.uncancel()


def create_app(config: RouterConfig) -> RouterApp:
    return RouterApp(config)


def _api(state: RouterState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await state.start()
        yield
        await state.stop()

    app = FastAPI(title="pdserve router", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=state.config.max_body_bytes)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.ready() and bool(state.pool.pool("decode"))
        body = {"status": "ok" if ok else "unavailable",
                "workers": [{"url": w.url, "role": w.role, "healthy": w.healthy} for w in state.pool.workers]}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        advice(state)  # the scaling advice is exported as gauges (what an HPA reads)
        for w in state.pool.workers:
            state.metrics.worker_inflight.labels(w.url, w.role).set(w.inflight)
            if w.load:
                ld, m = w.load, state.metrics
                m.worker_free_blocks.labels(w.url, w.role).set(ld.free_blocks)
                m.worker_host_blocks.labels(w.url, w.role).set(ld.host_blocks)
                m.worker_tier_hits.labels(w.url, w.role, "device").set(ld.prompt_tokens_cached - ld.host_hit_tokens)
                m.worker_tier_hits.labels(w.url, w.role, "host").set(ld.host_hit_tokens)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(m: ModelServing, adapter: str | None = None) -> dict:
        """A model's card, or a LoRA adapter's (`parent`: the model it runs on)."""
        ref = m.reference
        card = {"id": adapter or ref.model, "object": "model", "created": 0, "owned_by": "pdserve",
                "max_model_len": ref.max_model_len}
        return card if adapter is None else {**card, "parent": ref.model}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        """Every model served (the default one first), each followed by its LoRA adapters."""
        await _authenticate(state, request)
        _require_ready(state)
        served = [state.default, *(m for m in state.models.values() if m is not state.default)]
        return {"object": "list", "data": [model_card(m, a) for m in served
                                           for a in [None, *sorted(m.view.adapters())]]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        """One model (the OpenAI 404 for one this endpoint does not serve)."""
        await _authenticate(state, request)
        _require_ready(state)
        return model_card(*_model_of(state, model_id))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> dict:
        """The token ids the router would send for this prompt or chat (the chat template applied)."""
        await _authenticate(state, request)
        _require_ready(state)
        m, _ = _model_of(state, body.model)
        ids = await _prompt_ids(m, body.messages is not None, body)
        return {"tokens": ids, "count": len(ids), "max_model_len": m.reference.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
        await _authenticate(state, request)
        _require_ready(state)
        m, _ = _model_of(state, body.model)
        vocab = m.tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise OpenAIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": m.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    # The generation endpoints, declared for the schema: RouterApp.answer serves them before FastAPI would.
    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict:
        raise _not_here()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict:
        raise _not_here()

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest) -> dict:
        """OpenAI's Responses API, stateless (store and previous_response_id are refused)."""
        raise _not_here()

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest) -> dict:
        """Anthropic's Messages API (errors in Anthropic's shape)."""
        raise _not_here()

    app.include_router(admin_routes(state))
    app.mount("/dashboard/static", StaticFiles(directory=DASHBOARD_DIR), name="dashboard")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD_DIR / "index.html")

    @app.get("/dashboard/api/state", include_in_schema=False)
    async def dashboard_state(request: Request) -> dict:
        """Everything the dashboard shows, in one poll (admin token)."""
        state.door.check_admin(request.headers.get("authorization"))
        return {"time": time.time(), "model": state.pool.reference.model if state.pool.reference else None,
                "pools": {p: await pool_view(state, p) for p in ("prefill", "decode")},
                "series": state.telemetry.series(300.0), "errors": list(state.telemetry.errors),
                "advice": advice(state), "planner": _planner_view(state)}

    return app


def _not_here() -> OpenAIError:
    return OpenAIError(500, "this endpoint is answered by RouterApp, not by its FastAPI app")


class BodyLimit:
    """Refuse bodies over the limit before reading them (plain ASGI: no per-request task like
    BaseHTTPMiddleware). Chunked bodies without a length are cut off while streaming in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = _too_large(self.max_bytes)
        if _declared_over(scope, self.max_bytes):
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


# --- the hot path, shared by RouterApp and the FastAPI routes ---

def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(400, f"the request body is over {max_bytes} bytes", code="request_too_large")


def _declared_over(scope: dict, max_bytes: int) -> bool:
    """The request says (Content-Length) that its body is over the limit: refuse before reading it."""
    length = header(scope["headers"], b"content-length")
    return length is not None and length.isdigit() and int(length) > max_bytes


def _parse(chat: bool, raw: bytes) -> GenerationRequest:
    try:
        return parse(chat, raw)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


def _validated(model: type, raw: bytes | dict) -> Any:
    try:
        return model.model_validate_json(raw) if isinstance(raw, bytes) else model.model_validate(raw)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
    except ValueError as e:  # a model's own refusal raised outside validation
        raise OpenAIError(400, str(e)) from None


def _run_openai(chat: bool, state: "RouterState", body: Any, session: str | None, key, admitted: list) -> Awaitable:
    return handle(state, chat, body, session, key, admitted)


def _anthropic_error(e: OpenAIError) -> dict:
    return messages_api.error_body(e.status, e.message)


async def _run_translated(api: Any, prefix: str, endpoint: str, state: "RouterState", body: Any,
                          session: str | None, key, admitted: list) -> Reply:
    """A request of another API (responses_api, messages_api: `api`), as the chat request it amounts to,
    answered in that API's shape, streams included."""
    try:
        chat = _validated(ChatCompletionRequest, api.to_chat(body))
    except ValueError as e:
        raise OpenAIError(400, str(e)) from None
    rid = prefix + _request_id()
    reply = await handle(state, True, chat, session, key, admitted, encode=_identity, done=None, endpoint=endpoint)
    if reply.stream is None:
        return Reply(body=api.from_chat(body, reply.body, rid), completion_tokens=reply.completion_tokens)
    return Reply(stream=_translated(api.stream_events(body, reply.stream, rid), reply.stream), ticket=reply.ticket)


def _identity(chunk: dict) -> dict:
    return chunk


async def _translated(events: AsyncIterator[bytes], chunks: AsyncIterator) -> AsyncIterator[bytes]:
    """A translated stream that, when closed, closes the chat stream under it (which settles the request)."""
    try:
        async for data in events:
            yield data
    finally:
        await events.aclose()
        await chunks.aclose()


async def _authenticate(state: RouterState, request: Request):
    return await state.door.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))


def _require_ready(state: RouterState) -> None:
    if not state.ready():
        raise OpenAIError(503, "no worker has registered yet", code="no_healthy_worker")


def _model_of(state: RouterState, model: str) -> tuple[ModelServing, str | None]:
    """The model a request's `model` names, and the LoRA adapter it runs with (its own name, or
    `model:adapter`; None: the model alone); the OpenAI 404 for a name this endpoint does not serve."""
    m = state.models.get(model)
    if m is not None:
        return m, None
    base, _, name = model.rpartition(":")
    m = state.models.get(base)
    if m is not None and name in m.view.adapters():
        return m, name
    for m in state.models.values():
        if model in m.view.adapters():
            return m, model
    served = ", ".join(repr(n) for m in state.models.values() for n in [m.model, *sorted(m.view.adapters())])
    raise OpenAIError(404, f"the model {model!r} does not exist; this endpoint serves {served}", param="model",
                      code="model_not_found")


async def _prompt_ids(m: ModelServing, chat: bool, body: Any, tools: list | None = None) -> list[int]:
    if not chat:
        return await _completion_ids(m, body.prompt)
    try:
        messages = [m.as_template_dict() for m in body.messages]
        # the common case: no text rendered and cut
        parts = m.tokenizer.render_chat_parts(messages) if tools is None else None
        text = "" if parts is not None else m.tokenizer.render_chat(messages, tools=tools)
    except ChatTemplateError as e:
        raise OpenAIError(400, str(e), param="messages") from e
    except ValueError as e:
        raise OpenAIError(400, str(e), param="messages") from e
    return await (m.encoder.encode_parts(parts) if parts is not None else m.encoder.encode(text))


async def _completion_ids(m: ModelServing, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        vocab = m.tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return prompt
    return await m.encoder.encode(prompt) if prompt else []


def _wire_params(body: GenerationRequest, max_tokens: int, seed: int | None, out_plan: OutputPlan,
                 priority: int = 0, tenant: str = "", adapter: str | None = None) -> ParamsOut:
    bias = body.logit_bias
    return ParamsOut(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, seed=seed, stop=body.stop, ignore_eos=body.ignore_eos,
        logprobs=body.num_logprobs(), grammar=out_plan.grammar,
        prompt_logprobs=body.num_logprobs() if getattr(body, "echo", False) else None,
        logit_bias=[(int(t), b) for t, b in bias.items()] if bias else [],
        skip_special_tokens=not out_plan.keeps_special_tokens, priority=priority, tenant=tenant, adapter=adapter,
    )


def _priority(body: Any, key) -> int:
    """The request's scheduling priority: its own if its key allows it (no lower than the key's; without auth,
    any), else the key's."""
    asked = getattr(body, "priority", None)
    if asked is None:
        return key.priority
    if asked < key.priority and key is not ANONYMOUS:
        raise OpenAIError(400, f"this key's requests may not have a priority below {key.priority} (lower values "
                               f"go first)", param="priority", code="priority_not_allowed")
    return asked


_ID_PREFIX = os.urandom(8).hex()  # unique per router process: ids stay unique across replicas
_id_counter = itertools.count()


def _request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def _sse_event(chunk: dict) -> bytes:
    return b"data: " + _encode(chunk) + b"\n\n"


async def handle(state: RouterState, chat: bool, body: Any, session_header: str | None, key,
                 admitted: list | None = None, encode: Callable[[dict], Any] = _sse_event,
                 done: Any = b"data: [DONE]\n\n", endpoint: str | None = None) -> Reply:
    """One OpenAI request, validated and authenticated: tokenize, check limits and capacity, admit, route,
    and answer (JSON) or stream (SSE: each chunk through `encode`, then `done` if it ended well; None: not).
    With tracing on, the request is a span (ended when its answer or stream is), its steps spans under it."""
    endpoint = endpoint or ("chat" if chat else "completions")
    if state.tracer is None:
        return await _handle(state, chat, body, session_header, key, admitted, encode, done, endpoint, None)
    span = state.tracer.start("pdserve.request", attributes={"pdserve.endpoint": endpoint, "pdserve.model": body.model,
                                                             "pdserve.stream": bool(body.stream)})
    try:
        reply = await _handle(state, chat, body, session_header, key, admitted, encode, done, endpoint, span)
    except BaseException as e:
        state.tracer.end(span, error=e)
        raise
    if reply.stream is None:
        state.tracer.end(span, **{"gen_ai.usage.output_tokens": reply.completion_tokens})
    else:
        reply.stream = _traced(state.tracer, span, reply.stream)
        reply.on_close = lambda: span.is_recording() and state.tracer.end(span, **{"pdserve.client_left": True})
    return reply


async def _traced(tracer, span, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A stream that ends its request's span when it ends (a client that leaves is not an error of it)."""
    error, left = None, False
    try:
        async for data in stream:
            yield data
    except (GeneratorExit, asyncio.CancelledError):
        left = True
        raise
    except BaseException as e:
        error = e
        raise
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()
        tracer.end(span, error=error, **{"pdserve.client_left": left or None})


async def _handle(state: RouterState, chat: bool, body: Any, session_header: str | None, key, admitted: list | None,
                  encode: Callable[[dict], Any], done: Any, endpoint: str, span) -> Reply:
    _require_ready(state)
    m, adapter = _model_of(state, body.model)
    state.door.check_model(key, body.model)
    out_plan = plan(body, chat, m.tool_parser, state.config.reasoning_parser)
    priority = _priority(body, key)
    tenant = "" if key is ANONYMOUS else key.id  # (auth off: one tenant, the workers keep arrival order)
    if body.logit_bias and max(int(t) for t in body.logit_bias) >= m.tokenizer.vocab_size:
        raise OpenAIError(400, f"logit_bias token ids must be in [0, {m.tokenizer.vocab_size})",
                          param="logit_bias")
    with maybe_child(state.tracer, span, "pdserve.tokenize"):
        prompts = await _prompts(m, chat, body, out_plan)
    ref = m.reference
    longest = max(len(ids) for ids in prompts)
    if not min(len(ids) for ids in prompts):
        raise OpenAIError(400, "the prompt is empty", param="prompt")
    room = ref.max_model_len - longest
    if room < 1:
        raise OpenAIError(400, f"the prompt has {longest} tokens; this model's context is {ref.max_model_len}",
                          param="messages" if chat else "prompt", code="context_length_exceeded")
    max_tokens = body.output_limit() or min(room, state.config.max_output_tokens or room)
    if max_tokens > room:
        raise OpenAIError(400, f"max_tokens {max_tokens} plus the prompt's {longest} tokens exceed the "
                               f"context of {ref.max_model_len}", param="max_tokens", code="context_length_exceeded")
    if not m.view.pool("decode"):
        raise OpenAIError(503, f"no healthy decode worker for {ref.model}", code="no_healthy_worker")
    state.door.check_request(longest, max_tokens, chat)
    state.telemetry.arrived(sum(len(ids) for ids in prompts) * body.n)  # (demand, whether admitted or not)
    queued = sum(w.inflight_tokens for w in m.view.prefill_pool())
    capacity = state.door.capacity(m.view, queued, priority)
    if not capacity.ok:
        state.metrics.refused.labels(capacity.reason.split(" (")[0][:40]).inc()
        raise state.door.overloaded(capacity.reason)
    rid = ("chatcmpl-" if chat else "cmpl-") + _request_id()
    prompt_tokens = sum(len(ids) for ids in prompts)
    if span is not None:
        span.set_attributes({"pdserve.request_id": rid, "gen_ai.usage.input_tokens": prompt_tokens,
                             "pdserve.key": getattr(key, "name", None) or ""})
    with maybe_child(state.tracer, span, "pdserve.admission"):
        ticket = await _admit(state, key, rid, body.model, prompt_tokens, max_tokens * body.n * len(prompts),
                              admitted, priority, capacity.in_place_of)
    fmt = Formatter(m.tokenizer, body.model if adapter else ref.model, rid, chat)
    session = session_header or body.user
    streams = []
    for ids in prompts:  # n choices a prompt, in order
        hashes = m.dispatcher.hashes(ids, adapter)
        for i in range(body.n):
            params = _wire_params(body, max_tokens, None if body.seed is None else body.seed + i, out_plan, priority,
                                  tenant, adapter)
            streams.append(m.dispatcher.generate(f"{rid}-{len(streams)}", ids, params, hashes, session, span))
    readers = [ChoiceReader(out_plan) for _ in streams] if out_plan.reads_text else None
    echo = None
    if not chat and body.echo:
        texts = [p if isinstance(p, str) else m.tokenizer.decode(p, skip_special_tokens=False)
                 for p in body.prompts()]
        # (text, prompt ids) a choice: its prompt ids head its logprobs when they are asked
        echo = [(t, ids) for t, ids in zip(texts, prompts, strict=True) for _ in range(body.n)]
    state.metrics.prompt_tokens.inc(prompt_tokens * body.n)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Reply(stream=_sse(state, fmt, streams, prompt_tokens, include_usage, ticket, readers, echo, encode,
                                 done, endpoint), ticket=ticket)
    start = time.perf_counter()
    outcome = "cancelled"
    try:
        if len(streams) == 1:  # the common case: no task per choice
            results = [await _collect(streams[0], ticket)]
        else:
            results = await _collect_all(streams, ticket)
        outcome = "ok"
    except OpenAIError:
        outcome = "error"
        raise
    finally:
        await ticket.close(outcome)
    completion = sum(r[3] for r in results)
    n = body.n  # n choices a prompt: a prompt's cached tokens count once
    cached = sum(max(r[4] for r in results[i:i + n]) for i in range(0, len(results), n))
    _observe(state, start, completion, cached)
    choices = []
    for i, (text, reason, lps, _, _, stop, prompt_lps) in enumerate(results):
        message = None
        if readers is not None:
            message = assemble(readers[i].feed(text) + readers[i].finish())
            reason = readers[i].finish_reason(reason)
        if echo:
            text, lps = echo[i][0] + text, echoed_logprobs(echo[i][1], prompt_lps, lps)
        choices.append((text, reason, lps, message, stop))
    return Reply(body=fmt.full(choices, usage(prompt_tokens, completion, cached)), completion_tokens=completion)


async def _prompts(m: ModelServing, chat: bool, body: Any, out_plan: OutputPlan) -> list[list[int]]:
    if chat:
        return [await _prompt_ids(m, True, body, out_plan.tools)]
    return [await _completion_ids(m, p) for p in body.prompts()]


async def _admit(state: RouterState, key, rid: str, model: str, prompt_tokens: int, max_tokens: int,
                 admitted: list | None, priority: int, in_place_of: int | None) -> Ticket:
    """A reservation once taken is always settled, even if the client leaves while it is being taken."""
    admission = state.door.admit(key, rid, model, prompt_tokens, max_tokens, priority, in_place_of)
    if state.door.local:  # in memory: admit never suspends, so it cannot be cancelled half-way (no task)
        ticket = await admission
    else:
        admission = asyncio.ensure_future(admission)
        try:
            ticket = await asyncio.shield(admission)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                late = await admission
                if admitted is not None:
                    admitted.append(late)
                await late.close("cancelled")
            raise
    if admitted is not None:
        admitted.append(ticket)
    return ticket


async def _collect_all(streams: list[AsyncIterator[ChunkView]], ticket: Ticket) -> list[tuple]:
    """Every choice's result; when one fails (or the request is cancelled) the others stop too."""
    tasks = [asyncio.ensure_future(_collect(s, ticket)) for s in streams]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _collect(stream: AsyncIterator[ChunkView], ticket: Ticket
                   ) -> tuple[str, str | None, list[LogprobView], int, int, str | None, list[LogprobView] | None]:
    """(text, finish reason, logprobs, completion tokens, cached tokens, the stop string that ended it, the
    prompt's logprobs if asked)."""
    text, lps, reason, completion, cached, stop, prompt = [], [], None, 0, 0, None, None
    async for c in stream:
        if c.error:
            raise _worker_error(c)
        text.append(c.text)
        lps += c.logprobs
        if c.prompt_logprobs is not None:
            prompt = c.prompt_logprobs
        ticket.completion_tokens += c.completion_tokens - completion  # billed as it happens (also if cut off)
        ticket.cached_tokens = max(ticket.cached_tokens, c.cached_tokens)
        reason, completion, cached, stop = c.finish_reason, c.completion_tokens, c.cached_tokens, c.stop_reason
    return "".join(text), reason, lps, completion, cached, stop, prompt


def _worker_error(c: ChunkView) -> OpenAIError:
    code = c.error.get("code")
    status = {"invalid_request": 400, "kv_cache_full": 503}.get(code, 502)
    return OpenAIError(status, c.error.get("message", "worker error"), code=code)


def _observe(state: RouterState, start: float, completion: int, cached: int) -> None:
    state.telemetry.served(completion, cached)
    state.metrics.e2e.observe(time.perf_counter() - start)
    state.metrics.completion_tokens.inc(completion)
    state.metrics.cached_tokens.inc(cached)


async def _merge(streams: list[AsyncIterator[ChunkView]]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, chunk or OpenAIError) from several choices' streams (n > 1) as they come."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator[ChunkView]) -> None:
        try:
            async for c in s:
                await queue.put((i, c))
        except OpenAIError as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _sse(state: RouterState, fmt: Formatter, streams: list[AsyncIterator[ChunkView]], prompt_len: int,
               include_usage: bool, ticket: Ticket, readers: list[ChoiceReader] | None, echo: list[str] | None,
               encode: Callable[[dict], Any], done: Any, endpoint: str) -> AsyncIterator[Any]:
    """The choices' streams as one stream of chunks (each through `encode`, then `done` if it ended well);
    leaving early closes every worker stream. One stream (the common case) is read in place: no task, queue or
    generator between the worker's line and the client's chunk."""
    single = len(streams) == 1
    source = streams[0] if single else _merge(streams)
    start = last = time.perf_counter()
    first_seen, offsets, completion, cached = set(), [0] * len(streams), [0] * len(streams), 0
    status = "499"  # until it ends one way or the other: the client left
    stream_error: OpenAIError | None = None
    try:
        try:
            async for x in source:
                i, item = (0, x) if single else x
                if isinstance(item, OpenAIError) or item.error:
                    err = item if isinstance(item, OpenAIError) else _worker_error(item)
                    status, stream_error = str(err.status), err
                    yield encode(err.body())
                    break
                now = time.perf_counter()
                first = i not in first_seen
                if readers is not None:
                    for chunk in _read_chunks(fmt, i, item, first, readers[i]):
                        yield encode(chunk)
                elif echo is not None and first:
                    text = echo[i][0] + item.text
                    lps = echoed_logprobs(echo[i][1], item.prompt_logprobs, item.logprobs)
                    yield encode(fmt.chunk(i, item, first, offsets[i], text, lps))
                    offsets[i] += len(echo[i][0])
                else:
                    yield encode(fmt.chunk(i, item, first, offsets[i]))
                # Measured before the chunk went out, recorded after (off the path of the token to the client).
                if not first_seen:
                    state.metrics.ttft.observe(now - start)
                    state.telemetry.ttft(now - start)
                elif item.token_ids:
                    state.metrics.itl.observe(now - last)
                    state.telemetry.itl(now - last)
                last = now
                first_seen.add(i)
                offsets[i] += len(item.text)
                completion[i], cached = item.completion_tokens, max(cached, item.cached_tokens)
                ticket.completion_tokens, ticket.cached_tokens = sum(completion), cached
            else:
                status = "200"
                if include_usage:
                    yield encode(fmt.usage_chunk(usage(prompt_len, sum(completion), cached)))
                if done is not None:
                    yield done
        except OpenAIError as e:  # one stream's own failure (merged streams pass theirs on as items)
            status, stream_error = str(e.status), e
            yield encode(e.body())
    finally:
        await source.aclose()
        _observe(state, start, sum(completion), cached)
        state.count(endpoint, status, sum(completion), stream_error)
        await ticket.close({"200": "ok", "499": "cancelled"}.get(status, "error"))


def _read_chunks(fmt: Formatter, i: int, item: ChunkView, first: bool, reader: ChoiceReader) -> list[dict]:
    """A choice's chunk read through its reader: a chunk a delta (the first with the role), the logprobs
    with the first, and the finish reason on a last one."""
    deltas = reader.feed(item.text)
    if item.finished:
        deltas += reader.finish()
    if first:
        deltas = [{"role": "assistant", **(deltas[0] if deltas else {"content": ""})}, *deltas[1:]]
    lps = item.logprobs
    if lps and not deltas:
        deltas = [{}]
    chunks = [fmt.delta_chunk(i, d, lps if k == 0 else None, None) for k, d in enumerate(deltas)]
    if item.finished:
        chunks.append(fmt.delta_chunk(i, {}, None, reader.finish_reason(item.finish_reason), item.stop_reason))
    return chunks
