"""Fake decode workers for router tests: the real internal API, answering with their own name."""

import asyncio
import threading

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from bench.cluster import free_port
from protocol.messages import GenerateChunk, GenerateRequest, encode_frame


def fake_worker_app(name: str, tokenizer_files: dict[str, str], info: dict) -> FastAPI:
    app = FastAPI()
    app.state.requests = 0
    app.state.running = 0
    app.state.tokens = 0
    app.state.polls = 0
    app.state.bodies = []  # every GenerateRequest taken, in order
    app.state.instance = "first"  # its KV event log's identity: another after a "restart"
    channels: dict[str, asyncio.Queue] = {}  # a router's token channel: the frames to write on it
    streaming: dict[str, asyncio.Task] = {}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    async def get_info() -> dict:
        return {**info, "name": name}

    @app.get("/tokenizer")
    async def tokenizer() -> dict:
        return tokenizer_files

    @app.get("/load")
    async def load() -> dict:
        app.state.polls += 1
        return {"running": app.state.running, "waiting": 0, "tokens_sent": app.state.tokens, "free_blocks": 100, "total_blocks": 100, "tokens_computed": 0,
                "prompt_tokens_cached": 0}

    @app.get("/kv_events")
    async def kv_events(since: int = 0) -> dict:
        return {"seq": 0, "resync": False, "events": [], "instance": app.state.instance}

    @app.get("/channel/{channel_id}")
    async def channel(channel_id: str) -> StreamingResponse:
        frames = channels[channel_id] = asyncio.Queue()
        frames.put_nowait(b"[]\n")

        async def body():
            try:
                while True:
                    try:
                        frame = await asyncio.wait_for(frames.get(), 5.0)
                    except TimeoutError:
                        frame = b"[]\n"  # the heartbeat of an idle channel
                    if frame is None:  # the worker "dies": its channel ends
                        return
                    yield frame
            finally:
                channels.pop(channel_id, None)

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        """Taken at once; on the router's channel: one token, the worker's name, then EOS; with ignore_eos,
        max_tokens tokens 20 ms apart (the first after 1 s with the stop string SLOW_PREFILL). Stop strings
        that are instructions: POSITIONS makes each token its output position (token id and text " {pos}",
        a migrated stream's outputs counted); DIE_AFTER_k ends the channel (the worker "dies") after k tokens
        of its own, and DIE_FRESH_AFTER_k likewise unless the stream came migrated; with RESTARTS a death is a
        restart too (a new instance on /kv_events)."""
        frames = channels.get(req.channel)
        if frames is None:
            return JSONResponse({"error": {"message": "no open channel", "code": "unknown_channel"}}, 409)
        app.state.requests += 1
        app.state.bodies.append(req)
        n = req.params.max_tokens if req.params.ignore_eos else 1
        rid = req.request_id
        start = len(req.output_token_ids)
        positions = "POSITIONS" in req.params.stop
        die_after = next((int(s.rpartition("_")[2]) for s in req.params.stop if s.startswith("DIE_AFTER_")
                          or (s.startswith("DIE_FRESH_AFTER_") and not start)), None)
        if "FAIL" in req.params.stop:  # a test asks for a failed request
            frames.put_nowait(encode_frame([GenerateChunk(request_id=rid, finished=True, finish_reason="error", error={
                "message": "the test asked for a failure", "type": "invalid_request_error",
                "code": "invalid_request"}).model_dump()]))
            return {"ok": True}

        async def tokens():
            app.state.running += 1
            try:
                if "SLOW_PREFILL" in req.params.stop:  # a test asks for a prompt that takes a while to compute
                    await asyncio.sleep(1.0)
                for i in range(n - start):
                    if i == die_after:
                        frames.put_nowait(None)
                        if "RESTARTS" in req.params.stop:
                            app.state.instance = f"after-{rid}"
                        return
                    pos = start + i
                    last = pos == n - 1
                    frames.put_nowait(encode_frame([GenerateChunk(
                        request_id=rid, token_ids=[pos if positions else 1],
                        text=f" {pos}" if positions else name if i == 0 else " x", finished=last,
                        finish_reason="stop" if last else None, completion_tokens=pos + 1,
                        prompt_tokens=len(req.prompt_token_ids)).model_dump()]))
                    app.state.tokens += 1
                    if not last:
                        await asyncio.sleep(0.02)
            finally:
                app.state.running -= 1
                streaming.pop(rid, None)

        streaming[rid] = asyncio.get_running_loop().create_task(tokens())
        return {"ok": True}

    @app.post("/abort/{request_id}")
    async def abort(request_id: str) -> dict:
        task = streaming.pop(request_id, None)
        if task is not None:
            task.cancel()
        return {"ok": True}

    return app


def start_fake_worker(name: str, tokenizer_files: dict[str, str], info: dict, port: int = 0) -> uvicorn.Server:
    """One fake worker serving in a thread (on `port`, or a free one); `server.should_exit = True` stops it."""
    app = fake_worker_app(name, tokenizer_files, info)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port or free_port(), log_level="error"))
    threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True).start()
    return server


def start_fake_workers(n: int, tokenizer_files: dict[str, str], info: dict) -> list[str]:
    return [f"http://127.0.0.1:{start_fake_worker(f'fake-{i}', tokenizer_files, info).config.port}"
            for i in range(n)]



