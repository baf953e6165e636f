"""The decode worker's internal API (its frontend process; the engine runs in the core, worker/engine_core.py).

A router opens one long-lived channel (GET /channel/{id}) and sends each request with POST /generate naming
it; every step, the worker writes that router's chunks of the step as one frame on the channel (see
decode_worker/streams.py). Without a channel, /generate streams its own request's frames.

With a prefill_url, the worker reserves blocks for the prompt (reusing what its prefix cache holds), asks
the prefill worker to write the missing blocks into them (/send), then decodes from the first token the
prefill produced. Without one it prefills locally (conditional disaggregation, decided by the router). A
request that finds no blocks free to receive its KV is prefilled locally too, queued until blocks free up,
instead of being refused (the pool is momentarily full, not too small).
"""

import asyncio
from collections.abc import Callable

import httpx
import msgspec
from fastapi import FastAPI
from pydantic import ValidationError

from decode_worker.streams import HEARTBEAT_S, Channel, DecodeStreams
from protocol.asgi import read_body, send_bytes, until_disconnect
from protocol.http_client import TOKEN_HEADER, internal_client
from protocol.internal_auth import holds_token, refuse
from protocol.messages import GenerateRequest
from protocol.stream_client import StreamClient
from protocol.tokenizer import ChatTokenizer
from worker.common_routes import common_routes
from worker.frontend import Frontend

_NDJSON = [(b"content-type", b"application/x-ndjson")]
_JSON = [(b"content-type", b"application/json")]


def create_app(fe: Frontend) -> "DecodeApp":
    cfg = fe.config
    app = FastAPI(title=f"pdserve decode worker {cfg.name}")
    app.include_router(common_routes(fe))
    token = {TOKEN_HEADER: cfg.internal_token} if cfg.internal_token else None
    aborter = internal_client(httpx.Timeout(cfg.transfer_timeout_s + 5), token=cfg.internal_token)
    # /send, once a request: the data plane's client (httpx's pool assigns each request by walking every
    # connection, ~10% of a loaded decode worker's event loop with hundreds of prefills in flight)
    sender = StreamClient(cfg.transfer_timeout_s + 5, headers=token)
    app.router.on_shutdown += [aborter.aclose, sender.close]
    streams = DecodeStreams(fe.client, ChatTokenizer.from_files(fe.hello.tokenizer_files), fe.info.block_size,
                            fe.hello.descriptors, sender, aborter, fe.tracer, cfg.name)
    fe.handler = streams

    @app.post("/abort/{request_id}")
    async def abort(request_id: str) -> dict:
        streams.abort(request_id)
        return {"ok": True}

    return DecodeApp(app, fe, streams, cfg.internal_token)


class DecodeApp:
    """The decode worker's ASGI app: POST /generate (a GenerateRequest; 200 once taken, 409 for a channel that
    is not open, 422 for a malformed body) and GET /channel/{id} are answered here, in plain ASGI (a channel's
    frames are most of the worker's writes, and FastAPI's layers cost on each); everything else goes to the
    FastAPI app, whose `state`, `router` and `add_middleware` this passes through."""

    def __init__(self, api: FastAPI, fe: Frontend, streams: DecodeStreams, token: str | None):
        self.api, self.fe, self.streams = api, fe, streams
        self._token = token.encode() if token else None
        self.state, self.router = api.state, api.router

    def add_middleware(self, cls: type, **options) -> None:
        self.api.add_middleware(cls, **options)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "POST" and path == "/generate":
                return await self._guarded(self._generate, scope, receive, send)
            if method == "GET" and path.startswith("/channel/"):
                return await self._guarded(self._channel, scope, receive, send)
        return await self.api(scope, receive, send)

    async def _guarded(self, handler: Callable, scope: dict, receive: Callable, send: Callable) -> None:
        if self._token is not None and not holds_token(scope, self._token):
            return await refuse(send)
        if self.fe.error is not None or self.fe.draining:
            reason = f"engine failed: {self.fe.error}" if self.fe.error else "this worker is shutting down"
            body = msgspec.json.encode({"error": {"message": reason, "type": "server_error", "code": "unavailable"}})
            return await send_bytes(send, 503, body, _JSON)
        await handler(scope, receive, send)

    async def _generate(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            raw = await read_body(receive)
        except asyncio.CancelledError:  # the router left before sending the whole body
            return
        try:
            req = GenerateRequest.model_validate_json(raw)
        except ValidationError as e:
            detail = msgspec.json.encode({"detail": e.errors(include_url=False, include_context=False)})
            return await send_bytes(send, 422, detail, _JSON)
        if req.channel is None:  # this response is the request's own channel
            channel = Channel(None)
            self.streams.start(req, channel)
            await send({"type": "http.response.start", "status": 200, "headers": _NDJSON})
            try:
                await until_disconnect(_pump(channel, send, None), receive)
            finally:
                self.streams.drop_channel(channel)
            return await send({"type": "http.response.body", "body": b""})
        channel = self.streams.channels.get(req.channel)
        if channel is None or channel.closed:
            body = msgspec.json.encode({"error": {"message": f"no open channel {req.channel!r}",
                                                  "type": "invalid_request_error", "code": "unknown_channel"}})
            return await send_bytes(send, 409, body, _JSON)
        self.streams.start(req, channel)
        await send_bytes(send, 200, b'{"ok":true}', _JSON)

    async def _channel(self, scope: dict, receive: Callable, send: Callable) -> None:
        channel_id = scope["path"][len("/channel/"):]
        old = self.streams.channels.get(channel_id)
        if old is not None:  # the router reconnected under the same id: the old stream is over
            old.close()
            self.streams.drop_channel(old)
        channel = self.streams.channels[channel_id] = Channel(channel_id)
        await send({"type": "http.response.start", "status": 200, "headers": _NDJSON})
        try:
            await until_disconnect(_pump(channel, send, HEARTBEAT_S), receive)
        finally:
            self.streams.drop_channel(channel)
        await send({"type": "http.response.body", "body": b""})


async def _pump(channel: Channel, send: Callable, heartbeat_s: float | None) -> None:
    """Write the channel's frames as they come, until it is closed."""
    while (data := await channel.next(heartbeat_s)) is not None:
        await send({"type": "http.response.body", "body": data, "more_body": True})
