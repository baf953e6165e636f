"""Fake decode workers for router tests: the real internal API, answering with their own name."""

import asyncio
import threading

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from bench.cluster import free_port
from protocol.messages import GenerateChunk, GenerateRequest


def fake_worker_app(name: str, tokenizer_files: dict[str, str], info: dict) -> FastAPI:
    app = FastAPI()
    app.state.requests = 0

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
        return {"running": 0, "waiting": 0, "free_blocks": 100, "total_blocks": 100, "tokens_computed": 0,
                "prompt_tokens_cached": 0}

    @app.get("/kv_events")
    async def kv_events(since: int = 0) -> dict:
        return {"seq": 0, "resync": False, "events": []}

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> StreamingResponse:
        app.state.requests += 1
        chunk = GenerateChunk(token_ids=[1], text=name, finished=True, finish_reason="stop",
                              prompt_tokens=len(req.prompt_token_ids), completion_tokens=1)
        return StreamingResponse(iter([chunk.model_dump_json() + "\n"]), media_type="application/x-ndjson")

    return app


def start_fake_workers(n: int, tokenizer_files: dict[str, str], info: dict) -> list[str]:
    urls = []
    for i in range(n):
        port = free_port()
        app = fake_worker_app(f"fake-{i}", tokenizer_files, info)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        threading.Thread(target=lambda s=server: asyncio.run(s.serve()), daemon=True).start()
        urls.append(f"http://127.0.0.1:{port}")
    return urls



