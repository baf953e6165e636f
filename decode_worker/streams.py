"""A decode worker's requests in flight and the channels their tokens go out on.

Each step the engine core sends one message with every request's new tokens. This turns it into chunks
(detokenized, stop strings matched, logprobs) and writes, for each router channel, the step's chunks of
that router's requests as one frame: one line, one write, however many requests. A stop string matched here
ends the request in the core at once (an Abort goes out with the chunk), so the engine stops computing it
within a step. A router channel that closes aborts its requests and frees their blocks.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from engine.detokenizer import Detokenizer
from engine.errors import EngineDeadError, KVCacheFullError, RequestError
from engine.sampling_params import SamplingParams
from protocol.messages import ChunkView, GenerateRequest, LogprobView, SendRequest, SendResult, encode_frame
from protocol.stream_client import StreamClient, StreamClientError
from protocol.tokenizer import ChatTokenizer
from protocol.tracing import Tracer
from worker.engine_client import EngineClient
from worker.frontend import to_sampling_params
from worker.ipc import Step

log = logging.getLogger("pdserve.decode")
HEARTBEAT_S = 5.0  # an idle channel sends an empty frame this often (a router takes 6 missed ones as a dead worker)


class Channel:
    """One router process's long-lived stream from this worker: a line a frame. A solo channel is a
    /generate that streams its own chunks: it ends with its one request."""

    def __init__(self, channel_id: str | None):
        self.id = channel_id
        self.solo = channel_id is None
        self.requests: set[str] = set()
        self.pending: list[ChunkView] = []  # chunks of the step being turned into a frame
        # A router channel opens with an empty frame: the router's reader starts on the first bytes.
        self._lines: list[bytes] = [] if self.solo else [b"[]\n"]
        self._waiter: asyncio.Future | None = None
        self.closed = False

    def flush(self) -> None:
        self._lines.append(encode_frame(self.pending))
        self.pending = []
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, heartbeat_s: float | None) -> bytes | None:
        """What is ready to write (a heartbeat frame after heartbeat_s idle), or None once closed and written."""
        if not self._lines and not self.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, heartbeat_s)
            except TimeoutError:
                return b"[]\n"
            finally:
                self._waiter = None
        if self._lines:
            data = b"".join(self._lines)
            self._lines.clear()
            return data
        return None


@dataclass(slots=True)
class _Stream:
    request: GenerateRequest
    channel: Channel
    detok: Detokenizer
    min_tokens: int
    task: asyncio.Task | None = None  # the remote prefill's handshake, until the first token is in
    span: Any = None  # its trace's span on this worker (when traced)
    local: bool = True  # prefilled here (no prefill_url, or no room to receive its KV)


class RemotePrefillError(RuntimeError):
    pass


class DecodeStreams:
    def __init__(self, client: EngineClient, tokenizer: ChatTokenizer, block_size: int, descriptors: list[dict],
                 sender: StreamClient, aborter: httpx.AsyncClient, tracer: Tracer | None = None, name: str = ""):
        self.client, self.tokenizer, self.block_size = client, tokenizer, block_size
        self.tracer, self.name = tracer, name  # tracer None: tracing off
        self.descriptors = descriptors  # this worker's pools, one a rank, rank 0's first
        self.sender = sender  # /send to prefill workers (the data plane's client)
        self.aborter = aborter
        self.streams: dict[str, _Stream] = {}
        self.channels: dict[str, Channel] = {}
        self._tasks: set[asyncio.Task] = set()

    # --- requests in ---

    def start(self, req: GenerateRequest, channel: Channel) -> None:
        rid = req.request_id
        try:
            params = to_sampling_params(req.params)
            if rid in self.streams:
                raise RequestError(f"request id {rid!r} is already running")
            if req.prompt_token_ids and min(req.prompt_token_ids) < 0:
                raise RequestError("prompt token ids must be >= 0")
        except (RequestError, ValueError) as e:
            self._refuse(channel, _error(rid, str(e), "invalid_request_error", "invalid_request"))
            return
        if self.client.error is not None:  # the engine died after this request's checks at the door
            self._refuse(channel, _error(rid, f"engine failed: {self.client.error}", "server_error", "engine_failed"))
            return
        detok = Detokenizer(self.tokenizer, req.prompt_token_ids, params.stop, params.skip_special_tokens,
                            params.include_stop_str_in_output)
        detok.resume(req.output_token_ids)  # a migrated stream: its text so far went out from another worker
        st = self.streams[rid] = _Stream(req, channel, detok, params.min_tokens, local=not req.prefill_url)
        if self.tracer is not None and req.traceparent:
            st.span = self.tracer.start("pdserve.decode", req.traceparent, {
                "pdserve.worker": self.name, "pdserve.request_id": rid, "pdserve.prompt_tokens": len(req.prompt_token_ids),
                "pdserve.remote_prefill": bool(req.prefill_url)})
        channel.requests.add(rid)
        if req.prefill_url:
            st.task = asyncio.get_running_loop().create_task(self._remote(st, params))
        else:
            self.client.add(rid, req.prompt_token_ids, params, resumed=req.output_token_ids)

    def _refuse(self, channel: Channel, chunk: ChunkView) -> None:
        touched: list[Channel] = []
        self._put(channel, chunk, touched)
        self._flush(touched)

    async def _remote(self, st: _Stream, params: SamplingParams) -> None:
        """Reserve blocks, have the prefill worker fill them, then start decoding from its first token."""
        req = st.request
        rid = req.request_id
        send: asyncio.Task | None = None
        try:
            try:
                block_ids, cached = await self.client.reserve_remote(rid, req.prompt_token_ids, params,
                                                                     req.output_token_ids)
            except KVCacheFullError:
                # No blocks free for a transfer right now (nothing was reserved): rather than refuse, the prompt
                # waits in this worker's queue and is prefilled here once blocks free up; the prefill worker
                # drops its copy now instead of holding it until its timeout.
                log.info("request %s: no room to receive its KV now; prefilling it here", rid)
                st.task = None  # an abort from now on goes to the core
                st.local = True
                self.client.add(rid, req.prompt_token_ids, params, resumed=req.output_token_ids)
                self._background(self._drop_prefill(req.prefill_url, rid))
                return
            body = SendRequest(request_id=rid, dest=self.descriptors[0],
                               dests=self.descriptors if len(self.descriptors) > 1 else [],
                               dst_block_ids=block_ids, skip_blocks=cached // self.block_size,
                               traceparent=None if st.span is None else self.tracer.traceparent(st.span))
            # The prefill worker writes into the reserved blocks until /send answers: they are freed only then,
            # even if the request is aborted meanwhile (or another request could get them mid-write).
            send = asyncio.ensure_future(self._send(req.prefill_url, body.model_dump_json().encode()))
            sent = await asyncio.shield(send)
            st.task = None
            if st.span is not None:  # waiting for the prefill worker's KV (and first token)
                self.tracer.span("pdserve.decode.wait_kv", st.span, st.span.start_time / 1e9, time.time(),
                                 **{"pdserve.cached_tokens": cached})
            self.client.start_remote(rid, sent.first_token, _tuples(sent.logprobs),
                                     None if sent.prompt_logprobs is None else _tuples(sent.prompt_logprobs))
        except asyncio.CancelledError:  # aborted (the router left): the reserved blocks go back once unused
            if send is not None and not send.done():
                send.add_done_callback(lambda t: self._abort_after_send(t, rid))
            else:
                self.client.abort(rid)
            raise
        except RemotePrefillError as e:
            self.client.abort(rid)
            self._fail(rid, str(e), "prefill_failed", "prefill_failed")
        except RequestError as e:
            self._fail(rid, str(e), "invalid_request_error", "invalid_request")
        except EngineDeadError as e:
            self._fail(rid, str(e), "server_error", "engine_failed")  # if fail_all has not ended it already
        except Exception as e:  # nothing else may leave a request open with its blocks reserved
            log.exception("request %s: the remote prefill failed", rid)
            self.client.abort(rid)
            self._fail(rid, f"remote prefill failed: {e!r}", "prefill_failed", "prefill_failed")

    def _abort_after_send(self, send: asyncio.Task, rid: str) -> None:
        if not send.cancelled():
            send.exception()  # retrieved: the request is gone, whatever the send's outcome
        self.client.abort(rid)

    async def _send(self, prefill_url: str, body: bytes) -> SendResult:
        try:
            async with self.sender.post(f"{prefill_url}/send", body) as resp:
                data = await resp.read()
        except (StreamClientError, TimeoutError) as e:
            raise RemotePrefillError(f"remote prefill failed: {e!r}") from e
        if resp.status != 200:
            raise RemotePrefillError(f"prefill worker answered {resp.status}: {data[:200].decode(errors='replace')}")
        try:
            return SendResult.model_validate_json(data)
        except ValueError as e:
            raise RemotePrefillError(f"the prefill worker's answer is not a SendResult: {e}") from e

    async def _drop_prefill(self, prefill_url: str, rid: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self.aborter.post(f"{prefill_url}/abort/{rid}", timeout=2.0)

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def abort(self, rid: str) -> None:
        """The router gave up on the request: no more chunks for it, its blocks freed now."""
        st = self.streams.pop(rid, None)
        if st is not None:
            st.channel.requests.discard(rid)
            if st.span is not None:
                self.tracer.end(st.span, **{"pdserve.aborted": True})
            if st.task is not None:
                st.task.cancel()  # its handler aborts in the core
                return
        self.client.abort(rid)

    def drop_channel(self, channel: Channel) -> None:
        """The channel's router is gone: its requests end."""
        if self.channels.get(channel.id) is channel:
            del self.channels[channel.id]
        for rid in list(channel.requests):
            self.abort(rid)

    # --- outputs ---

    def on_step(self, step: Step) -> None:
        touched: list[Channel] = []
        for out in step.outs:
            st = self.streams.get(out.request_id)
            if st is None:  # aborted, or ended here by a stop string: the core's extra token is dropped
                continue
            if st.span is not None:
                self._trace(st, out)
            reason = out.finish_reason
            stopped = False
            tokens = out.token_ids
            if reason == "stop" and not st.request.params.skip_special_tokens and st.request.params.grammar is None:
                tokens = tokens[:-1]  # the end-of-text or stop token that ended it: not text, special or not
            for tok in tokens:
                if st.detok.add(tok) and out.num_output_tokens >= st.min_tokens:
                    stopped = True
            if stopped:
                if reason is None:
                    self.client.abort(out.request_id)  # the engine would go on: stop it now
                reason = "stop"
            prompt = None if out.prompt_logprobs is None else _views(out.prompt_logprobs)
            chunk = ChunkView(out.request_id, out.token_ids, st.detok.take_delta(final=reason is not None),
                              reason is not None, reason, _views(out.logprobs or []), out.num_prompt_tokens,
                              out.num_cached_tokens, out.num_output_tokens, None,
                              st.detok.stop_hit if stopped else None, prompt)
            self._put(st.channel, chunk, touched)
            if reason is not None:
                self._end(out.request_id)
        for refused in step.refused:
            if refused.request_id in self.streams:
                kind = "invalid_request_error" if refused.kind == "invalid_request" else "server_error"
                self._put(self.streams[refused.request_id].channel,
                          _error(refused.request_id, refused.message, kind, refused.kind), touched)
                self._end(refused.request_id, refused.message)
        self._flush(touched)

    def fail_all(self, message: str) -> None:
        """The engine is gone: every request in flight ends with an engine_failed error."""
        touched: list[Channel] = []
        for rid, st in list(self.streams.items()):
            if st.task is not None:
                st.task.cancel()
            self._put(st.channel, _error(rid, f"engine failed: {message}", "server_error", "engine_failed"), touched)
            self._end(rid, f"engine failed: {message}")
        self._flush(touched)

    def in_flight(self) -> int:
        return len(self.streams)

    def close_streams(self) -> None:
        for channel in list(self.channels.values()):
            channel.close()

    def _fail(self, rid: str, message: str, kind: str, code: str) -> None:
        st = self.streams.get(rid)
        if st is not None:
            touched: list[Channel] = []
            self._put(st.channel, _error(rid, message, kind, code), touched)
            self._end(rid, message)
            self._flush(touched)

    @staticmethod
    def _put(channel: Channel, chunk: ChunkView, touched: list[Channel]) -> None:
        if not channel.pending:
            touched.append(channel)
        channel.pending.append(chunk)

    def _trace(self, st: _Stream, out) -> None:
        """A traced request's output: its queue and prefill here (prefilled locally), its first token."""
        now = time.time()
        if out.queued_s is not None and st.local:
            start = st.span.start_time / 1e9
            queued = min(out.queued_s, now - start)
            self.tracer.span("pdserve.decode.queue", st.span, start, start + queued)
            self.tracer.span("pdserve.decode.prefill", st.span, start + queued, now,
                             **{"pdserve.cached_tokens": out.num_cached_tokens})
        if out.num_output_tokens - len(out.token_ids) <= len(st.request.output_token_ids):  # its first token
            st.span.add_event("first_token", timestamp=int(now * 1e9))
        st.span.set_attribute("gen_ai.usage.output_tokens", out.num_output_tokens)

    def _end(self, rid: str, error: str | None = None) -> None:
        st = self.streams.pop(rid)
        st.channel.requests.discard(rid)
        if st.span is not None:
            self.tracer.end(st.span, error=error)

    @staticmethod
    def _flush(touched: list[Channel]) -> None:
        for channel in touched:
            channel.flush()
            if channel.solo and not channel.requests:
                channel.close()


def _tuples(lps: list) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """A SendResult's logprobs as the core's messages carry them."""
    return [(lp.token_id, lp.logprob, [tuple(t) for t in lp.top]) for lp in lps]


def _views(lps: list[tuple[int, float, list[tuple[int, float]]]]) -> list[LogprobView]:
    """The core's logprob tuples as a chunk carries them."""
    return [LogprobView(t, lp, top) for t, lp, top in lps]


def _error(rid: str, message: str, kind: str, code: str) -> ChunkView:
    return ChunkView(request_id=rid, finished=True, finish_reason="error",
                     error={"message": message, "type": kind, "code": code})
