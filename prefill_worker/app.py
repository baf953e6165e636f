"""The prefill worker's internal API (its frontend process; the engine runs in the core, worker/engine_core.py).

The router sends POST /prefill and the decode worker POST /send for the same request at about the same
time (no extra round trip): /prefill computes the prompt's KV and holds its blocks; /send waits for that,
has the core write the blocks the decode worker lacks into its reserved ones, releases them and returns the
first token.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse

from engine.errors import EngineDeadError, RequestError
from kv_transfer.descriptors import TransferError
from protocol.messages import PrefillRequest, SendRequest, SendResult, TokenLogprobWire
from worker.common_routes import common_routes
from worker.frontend import Frontend, to_sampling_params
from worker.ipc import Out, Step

log = logging.getLogger("pdserve.prefill")


@dataclass
class Pending:
    """The two halves of one request's handshake meet here, whichever arrives first."""

    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    sent: asyncio.Event = field(default_factory=asyncio.Event)
    prefilling: bool = False  # its /prefill came (and removes it when it ends); else /send does


class PrefillRequests:
    """The frontend's view of the prefills in the core: each one's single output, as a future."""

    def __init__(self) -> None:
        self.outputs: dict[str, asyncio.Future[Out]] = {}
        self.pending: dict[str, Pending] = {}  # handshakes: a prefill held until its decode worker takes the KV

    def wait_for(self, request_id: str) -> asyncio.Future[Out]:
        future = self.outputs[request_id] = asyncio.get_running_loop().create_future()
        return future

    def end(self, request_id: str, error: Exception) -> None:
        future = self.outputs.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def on_step(self, step: Step) -> None:
        for out in step.outs:
            future = self.outputs.pop(out.request_id, None)
            if future is not None and not future.done():
                future.set_result(out)
        for refused in step.refused:
            self.end(refused.request_id, RequestError(refused.message))

    def fail_all(self, message: str) -> None:
        for rid in list(self.outputs):
            self.end(rid, EngineDeadError(f"engine failed: {message}"))

    def in_flight(self) -> int:
        return len(self.outputs) + len(self.pending)

    def close_streams(self) -> None:
        """A prefill worker's answers end by themselves: nothing to close."""


def create_app(fe: Frontend) -> FastAPI:
    app = FastAPI(title=f"pdserve prefill worker {fe.config.name}")
    app.include_router(common_routes(fe))
    client = fe.client
    requests = fe.handler = PrefillRequests()
    pending = requests.pending
    aborted: dict[str, float] = {}  # request id -> when: an /abort can overtake its /prefill
    timeout = fe.config.transfer_timeout_s
    tr = fe.tracer  # None: tracing off

    @app.post("/prefill")
    async def prefill(req: PrefillRequest) -> JSONResponse:
        rid = req.request_id
        refusal = None
        if aborted.pop(rid, None) is not None:
            refusal = JSONResponse({"error": {"message": "aborted before it started",
                                              "type": "invalid_request_error"}}, 409)
        elif fe.error is not None or fe.draining:
            refusal = JSONResponse({"error": {"message": fe.error or "shutting down", "type": "server_error"}}, 503)
        if refusal is not None:
            waiting = pending.pop(rid, None)
            if waiting is not None:  # its /send came first: it fails now, not at its timeout
                _fail(waiting, RequestError("the prefill was refused"))
            return refusal
        p = pending.setdefault(rid, Pending())
        p.prefilling = True
        output = None
        span = error = None
        if tr is not None and req.traceparent:
            span = tr.start("pdserve.prefill", req.traceparent, {"pdserve.worker": fe.config.name,
                                                                "pdserve.request_id": rid,
                                                                "pdserve.prompt_tokens": len(req.prompt_token_ids)})
        try:
            # One token: after a migrated stream's outputs, the next one (its position keys a seeded draw).
            params = to_sampling_params(req.params, max_tokens=len(req.output_token_ids) + 1, stop=(), min_tokens=0)
            output = requests.wait_for(rid)
            client.add(rid, req.prompt_token_ids, params, hold_kv=True, resumed=req.output_token_ids)
            out = await output
            if not out.token_ids:
                raise RequestError("the prefill was aborted")
            if span is not None:
                _trace_compute(tr, span, out)
            if not p.result.done():
                p.result.set_result(out)
            await asyncio.wait_for(p.sent.wait(), timeout)
            return JSONResponse({"ok": True})
        except (RequestError, ValueError) as e:
            _fail(p, e)
            error = e
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, 400)
        except EngineDeadError as e:
            _fail(p, e)
            error = e
            return JSONResponse({"error": {"message": str(e), "type": "server_error"}}, 503)
        except TimeoutError:
            _fail(p, TimeoutError("no decode worker asked for this KV in time"))
            error = "KV was not collected in time"
            return JSONResponse({"error": {"message": "KV was not collected in time", "type": "timeout"}}, 504)
        finally:
            if span is not None:
                tr.end(span, error=error)
            pending.pop(rid, None)
            if output is not None and (output.cancelled() or not output.done()):  # cancelled while it computed
                requests.end(rid, RequestError("aborted"))
                client.abort(rid)
            client.release(rid)

    @app.post("/send")
    async def send(req: SendRequest) -> dict:
        p = pending.setdefault(req.request_id, Pending())
        span = None
        try:
            out = await asyncio.wait_for(asyncio.shield(p.result), timeout)
            if tr is not None and req.traceparent:
                span = tr.start("pdserve.kv_transfer", req.traceparent, {
                    "pdserve.worker": fe.config.name, "pdserve.request_id": req.request_id,
                    "pdserve.blocks": len(req.dst_block_ids) - req.skip_blocks, "pdserve.transport": fe.config.transport})
            moved = await client.send_kv(req.request_id, req.dests or [req.dest], req.dst_block_ids, req.skip_blocks,
                                         timeout)
            if span is not None:
                tr.end(span, **{"pdserve.bytes_moved": moved})
                span = None
        except TimeoutError as e:
            raise HTTPException(504, "the prefill did not finish in time") from e
        except TransferError as e:
            raise HTTPException(502, f"KV transfer failed: {e}") from e
        except (RequestError, ValueError) as e:
            raise HTTPException(400, str(e)) from e
        except EngineDeadError as e:
            raise HTTPException(503, str(e)) from e
        finally:
            if span is not None:  # the transfer failed
                tr.end(span, error="the KV transfer did not complete")
            p.sent.set()
            if not p.prefilling and pending.get(req.request_id) is p:
                del pending[req.request_id]  # no /prefill came to end it
        def wire(lps: list) -> list[TokenLogprobWire]:
            return [TokenLogprobWire(token_id=t, logprob=lp, top=list(top)) for t, lp, top in lps]

        return SendResult(first_token=out.token_ids[0], logprobs=wire(out.logprobs or []),
                          prompt_logprobs=None if out.prompt_logprobs is None else wire(out.prompt_logprobs),
                          num_blocks_sent=len(req.dst_block_ids) - req.skip_blocks).model_dump()

    @app.post("/abort/{request_id}")
    async def abort(request_id: str) -> dict:
        client.abort(request_id)
        requests.end(request_id, RequestError("aborted"))
        p = pending.get(request_id)
        if p is not None:
            _fail(p, RequestError("aborted"))
        else:  # its /prefill may still be on the way: refuse it when it comes
            now = time.monotonic()
            aborted[request_id] = now
            if len(aborted) > 10_000:  # bounded: ids whose /prefill never came age out
                for rid in [r for r, t in aborted.items() if now - t > 2 * timeout]:
                    del aborted[rid]
        return {"ok": True}

    return app


def _trace_compute(tr, span, out: Out) -> None:
    """The prefill's time in its engine's queue, then computing, under its span (known once its token is)."""
    now = time.time()
    start = span.start_time / 1e9
    queued = min(out.queued_s or 0.0, now - start)
    tr.span("pdserve.prefill.queue", span, start, start + queued)
    tr.span("pdserve.prefill.compute", span, start + queued, now, **{"pdserve.cached_tokens": out.num_cached_tokens})


def _fail(p: Pending, error: Exception) -> None:
    if not p.result.done():
        p.result.set_exception(error)
        p.result.exception()  # retrieved: nobody may wait for it (the request was aborted), and that is fine
    p.sent.set()
