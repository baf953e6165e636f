"""Routes every worker serves to routers: health, info, tokenizer files, load and KV events."""

from fastapi import APIRouter, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from worker.runtime import WorkerRuntime


def common_routes(rt: WorkerRuntime) -> APIRouter:
    r = APIRouter()
    registry = CollectorRegistry()
    labels = {"worker": rt.config.name, "role": rt.config.role}
    gauges = {name: Gauge(f"pdserve_worker_{name}", help_, list(labels), registry=registry)
              for name, help_ in (("running", "Requests running"), ("waiting", "Requests waiting"),
                                  ("free_kv_blocks", "Free KV blocks"), ("total_kv_blocks", "KV blocks"),
                                  ("tokens_computed", "Tokens run through the model"),
                                  ("prompt_tokens_cached", "Prompt tokens served from the prefix cache"))}

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

    @r.get("/metrics")
    async def metrics() -> Response:
        load = rt.load()
        values = {"running": load.running, "waiting": load.waiting, "free_kv_blocks": load.free_blocks,
                  "total_kv_blocks": load.total_blocks, "tokens_computed": load.tokens_computed,
                  "prompt_tokens_cached": load.prompt_tokens_cached}
        for name, value in values.items():
            gauges[name].labels(**labels).set(value)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @r.get("/kv_events")
    async def kv_events(since: int = 0) -> dict:
        events = rt.events.since(since)
        if events is None:  # the caller missed events: it gets the whole cache to start over from
            seq, hashes = await rt.snapshot()
            return {"seq": seq, "resync": True, "block_hashes": hashes, "events": []}
        return {"seq": rt.events.seq, "resync": False, "events": [dict(seq=s, **e.to_dict()) for s, e in events]}

    return r
