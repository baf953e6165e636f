"""The prefill worker's internal API.

The router sends POST /prefill and the decode worker POST /send for the same request at about the same
time (no extra round trip): /prefill computes the prompt's KV and holds its blocks; /send waits for that,
writes the blocks the decode worker lacks into its reserved ones, releases them and returns the first token.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse

from engine.errors import RequestError
from kv_transfer.descriptors import PoolDescriptor, TransferError
from protocol.messages import PrefillRequest, SendRequest, SendResult, TokenLogprobWire
from worker.common_routes import common_routes
from worker.runtime import WorkerRuntime, to_sampling_params

log = logging.getLogger("pdserve.prefill")


@dataclass
class Pending:
    """The two halves of one request's handshake meet here, whichever arrives first."""

    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    sent: asyncio.Event = field(default_factory=asyncio.Event)


def create_app(rt: WorkerRuntime) -> FastAPI:
    app = FastAPI(title=f"pdserve prefill worker {rt.config.name}")
    app.include_router(common_routes(rt))
    pending: dict[str, Pending] = {}
    aborted: dict[str, float] = {}  # request id -> when: an /abort can overtake its /prefill
    timeout = rt.config.transfer_timeout_s

    @app.post("/prefill")
    async def prefill(req: PrefillRequest) -> JSONResponse:
        if aborted.pop(req.request_id, None) is not None:
            return JSONResponse({"error": {"message": "aborted before it started", "type": "invalid_request_error"}},
                                409)
        p = pending.setdefault(req.request_id, Pending())
        try:
            params = to_sampling_params(req.params, max_tokens=1, stop=(), min_tokens=0)
            outputs = [o async for o in rt.engine.generate(req.request_id, req.prompt_token_ids, params, hold_kv=True)]
            out = outputs[-1] if outputs else None
            if out is None or not out.new_token_ids:
                raise RequestError("the prefill was aborted")
            if not p.result.done():
                p.result.set_result(out)
            await asyncio.wait_for(p.sent.wait(), timeout)
            return JSONResponse({"ok": True})
        except (RequestError, ValueError) as e:
            _fail(p, e)
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, 400)
        except TimeoutError:
            _fail(p, TimeoutError("no decode worker asked for this KV in time"))
            return JSONResponse({"error": {"message": "KV was not collected in time", "type": "timeout"}}, 504)
        finally:
            pending.pop(req.request_id, None)
            await rt.engine.call(lambda e: e.release_held(req.request_id))

    @app.post("/send")
    async def send(req: SendRequest) -> dict:
        p = pending.setdefault(req.request_id, Pending())
        try:
            out = await asyncio.wait_for(asyncio.shield(p.result), timeout)
            blocks = await rt.engine.call(lambda e: e.held_blocks(req.request_id))
            if blocks is None:
                raise TransferError("the prefilled blocks are gone (cancelled)")
            dests = [PoolDescriptor.from_dict(d) for d in (req.dests or [req.dest])]
            src, dst = blocks[req.skip_blocks :], req.dst_block_ids[req.skip_blocks :]
            if len(src) != len(dst):
                raise TransferError(f"{len(dst)} destination blocks for {len(src)} prefilled blocks")
            rt.kv_bytes_sent += await rt.send_kv(dests, src, dst, timeout)
        except TimeoutError as e:
            raise HTTPException(504, "the prefill did not finish in time") from e
        except TransferError as e:
            raise HTTPException(502, f"KV transfer failed: {e}") from e
        except (RequestError, ValueError) as e:
            raise HTTPException(400, str(e)) from e
        finally:
            p.sent.set()
        lps = [TokenLogprobWire(token_id=lp.token_id, logprob=lp.logprob, top=list(lp.top)) for lp in out.logprobs]
        return SendResult(first_token=out.new_token_ids[0], logprobs=lps, num_blocks_sent=len(src)).model_dump()

    @app.post("/abort/{request_id}")
    async def abort(request_id: str) -> dict:
        rt.engine.abort(request_id)
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


def _fail(p: Pending, error: Exception) -> None:
    if not p.result.done():
        p.result.set_exception(error)
        p.result.exception()  # retrieved: nobody may wait for it (the request was aborted), and that is fine
    p.sent.set()
