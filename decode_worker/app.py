"""The decode worker's internal API: POST /generate streams a request's tokens as NDJSON lines.

With a prefill_url, the worker reserves blocks for the prompt (reusing what its prefix cache holds), asks
the prefill worker to write the missing blocks into them (/send), then decodes from the first token the
prefill produced. Without one it prefills locally (conditional disaggregation, decided by the router). A
request that finds no blocks free to receive its KV is prefilled locally too, queued until blocks free up,
instead of being refused (the pool is momentarily full, not too small).
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import httpx
import msgspec
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from engine.async_engine import EngineDeadError
from engine.errors import KVCacheFullError, RequestError
from engine.outputs import RequestOutput, TokenLogprob
from protocol.asgi import read_body, send_bytes, send_stream, until_disconnect
from protocol.http_client import TOKEN_HEADER, internal_client
from protocol.internal_auth import holds_token, refuse
from protocol.messages import GenerateChunk, GenerateRequest, SendRequest, SendResult
from protocol.stream_client import StreamClient, StreamClientError
from worker.common_routes import common_routes
from worker.runtime import WorkerRuntime, to_sampling_params

log = logging.getLogger("pdserve.decode")


_encode = msgspec.json.Encoder().encode


def _chunk(out: RequestOutput) -> bytes:
    """A GenerateChunk's line, encoded straight from the engine's values (nothing to validate): this runs once
    a token a request, and msgspec takes ~1 us where pydantic's model_construct + model_dump_json took ~15."""
    return _encode({
        "token_ids": out.new_token_ids, "text": out.text_delta, "finished": out.finished,
        "finish_reason": out.finish_reason.value if out.finish_reason else None,
        "logprobs": [{"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top} for lp in out.logprobs],
        "prompt_tokens": out.num_prompt_tokens, "cached_tokens": out.num_cached_tokens,
        "completion_tokens": out.num_output_tokens, "error": None,
    }) + b"\n"


def _error(message: str, kind: str, code: str) -> bytes:
    return GenerateChunk(finished=True, finish_reason="error",
                         error={"message": message, "type": kind, "code": code}).model_dump_json().encode() + b"\n"


def create_app(rt: WorkerRuntime) -> "DecodeApp":
    app = FastAPI(title=f"pdserve decode worker {rt.config.name}")
    app.include_router(common_routes(rt))
    client = internal_client(httpx.Timeout(rt.config.transfer_timeout_s + 5), token=rt.config.internal_token)
    app.router.on_shutdown.append(client.aclose)
    # /send, once a request: the data plane's client (httpx's pool assigns each request by walking every
    # connection, ~10% of a loaded decode worker's event loop with hundreds of prefills in flight)
    sender = StreamClient(rt.config.transfer_timeout_s + 5,
                          headers={TOKEN_HEADER: rt.config.internal_token} if rt.config.internal_token else None)
    app.router.on_shutdown.append(sender.close)

    async def remote_prefill(req: GenerateRequest) -> tuple[int, list[TokenLogprob]]:
        """Reserve blocks, have the prefill worker fill them; the prefill's first token and its logprobs."""
        params = to_sampling_params(req.params)
        reserved = await rt.engine.call(lambda e: e.reserve_remote(req.request_id, req.prompt_token_ids, params))
        skip = reserved.num_cached_tokens // rt.config.block_size
        body = SendRequest(request_id=req.request_id, dest=rt.descriptor.to_dict(),
                           dests=[d.to_dict() for d in rt.descriptors] if len(rt.descriptors) > 1 else [],
                           dst_block_ids=list(reserved.block_ids), skip_blocks=skip)
        try:
            async with sender.post(f"{req.prefill_url}/send", body.model_dump_json().encode()) as resp:
                data = await resp.read()
        except (StreamClientError, TimeoutError) as e:
            raise RemotePrefillError(f"remote prefill failed: {e!r}") from e
        if resp.status != 200:
            raise RemotePrefillError(f"prefill worker answered {resp.status}: {data[:200].decode(errors='replace')}")
        sent = SendResult.model_validate_json(data)
        lps = [TokenLogprob(lp.token_id, lp.logprob, tuple(tuple(t) for t in lp.top)) for lp in sent.logprobs]
        return sent.first_token, lps

    async def stream(req: GenerateRequest) -> AsyncIterator[bytes]:
        try:
            remote = None
            if req.prefill_url:
                try:
                    remote = await remote_prefill(req)
                except KVCacheFullError:
                    # No blocks free for a transfer right now (nothing was reserved): rather than refuse, the
                    # prompt waits in this worker's queue and is prefilled here once blocks free up; the
                    # prefill worker drops its copy now instead of holding it until its timeout.
                    log.info("request %s: no room to receive its KV now; prefilling it here", req.request_id)
                    with contextlib.suppress(httpx.HTTPError):
                        await client.post(f"{req.prefill_url}/abort/{req.request_id}", timeout=2.0)
                except BaseException:  # failed, or the client left: the reserved blocks go back at once
                    rt.engine.abort(req.request_id)
                    raise
            if remote is not None:
                token, lps = remote
                batches = rt.engine.stream_batches(req.request_id,
                                                   lambda e: e.start_remote(req.request_id, token, lps))
            else:
                batches = rt.engine.generate_batches(req.request_id, req.prompt_token_ids,
                                                     to_sampling_params(req.params))
            async for batch in batches:  # what arrived while the last write went out: one write
                yield b"".join([_chunk(out) for out in batch])
        except RemotePrefillError as e:
            yield _error(str(e), "prefill_failed", "prefill_failed")
        except KVCacheFullError as e:
            yield _error(str(e), "overloaded", "kv_cache_full")
        except (RequestError, ValueError) as e:
            yield _error(str(e), "invalid_request_error", "invalid_request")
        except EngineDeadError as e:
            yield _error(str(e), "server_error", "engine_failed")

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> StreamingResponse:
        """Documents the route for the schema; DecodeApp answers it (the same stream)."""
        return StreamingResponse(stream(req), media_type="application/x-ndjson")

    @app.post("/abort/{request_id}")
    async def abort(request_id: str) -> dict:
        rt.engine.abort(request_id)
        return {"ok": True}

    return DecodeApp(app, stream, rt.config.internal_token)


class DecodeApp:
    """The decode worker's ASGI app: POST /generate is answered here, in plain ASGI (its streams are most of the
    worker's writes, one a request a step, and FastAPI's middleware and StreamingResponse layers cost on each
    write); everything else goes to the FastAPI app, whose `state`, `router` and `add_middleware` this passes
    through. Leaving a stream (the router gone) closes its generator, which aborts the request and frees its
    blocks."""

    def __init__(self, api: FastAPI, stream: Callable[[GenerateRequest], AsyncIterator[bytes]], token: str | None):
        self.api, self._stream = api, stream
        self._token = token.encode() if token else None
        self.state, self.router = api.state, api.router

    def add_middleware(self, cls: type, **options) -> None:
        self.api.add_middleware(cls, **options)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/generate":
            return await self._generate(scope, receive, send)
        return await self.api(scope, receive, send)

    async def _generate(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self._token is not None and not holds_token(scope, self._token):
            return await refuse(send)
        try:
            raw = await read_body(receive)
        except asyncio.CancelledError:  # the router left before sending the whole body
            return
        try:
            req = GenerateRequest.model_validate_json(raw)
        except ValidationError as e:
            detail = msgspec.json.encode({"detail": e.errors(include_url=False, include_context=False)})
            return await send_bytes(send, 422, detail, [(b"content-type", b"application/json")])
        await until_disconnect(send_stream(send, self._stream(req), _NDJSON), receive)


_NDJSON = [(b"content-type", b"application/x-ndjson")]


class RemotePrefillError(RuntimeError):
    pass
