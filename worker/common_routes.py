"""Routes every worker serves to routers: health, info, tokenizer files, load and KV events."""

from fastapi import APIRouter, HTTPException

from worker.runtime import WorkerRuntime


def common_routes(rt: WorkerRuntime) -> APIRouter:
    r = APIRouter()

    @r.get("/health")
    async def health() -> dict:
        if rt.engine.error is not None:
            raise HTTPException(503, f"engine failed: {rt.engine.error}")
        return {"status": "ok"}

    @r.get("/ready")
    async def ready() -> dict:
        return await health()

    @r.get("/info")
    async def info() -> dict:
        return rt.info.model_dump()

    @r.get("/tokenizer")
    async def tokenizer() -> dict:
        return rt.tokenizer_files

    @r.get("/load")
    async def load() -> dict:
        return rt.load().model_dump()

    @r.get("/kv_events")
    async def kv_events(since: int = 0) -> dict:
        events = rt.events.since(since)
        if events is None:  # the caller missed events: it gets the whole cache to start over from
            seq, hashes = await rt.snapshot()
            return {"seq": seq, "resync": True, "block_hashes": hashes, "events": []}
        return {"seq": rt.events.seq, "resync": False, "events": [dict(seq=s, **e.to_dict()) for s, e in events]}

    return r
