"""Routes every worker serves to routers: health, info, tokenizer files, load, KV events and LoRA adapters."""

import msgspec
from fastapi import APIRouter, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from pydantic import BaseModel

from engine.errors import EngineDeadError, RequestError
from protocol.messages import WorkerLoad
from worker.frontend import Frontend


class AdapterLoad(BaseModel):
    name: str
    path: str  # a PEFT LoRA adapter folder on the worker's filesystem (its volume)


def common_routes(fe: Frontend) -> APIRouter:
    r = APIRouter()
    registry = CollectorRegistry()
    labels = {"worker": fe.config.name, "role": fe.config.role}
    gauges = {name: Gauge(f"pdserve_worker_{name}", help_, list(labels), registry=registry)
              for name, help_ in (("running", "Requests running"), ("waiting", "Requests waiting"),
                                  ("free_kv_blocks", "Free KV blocks"), ("total_kv_blocks", "KV blocks"),
                                  ("tokens_computed", "Tokens run through the model"),
                                  ("prompt_tokens_cached", "Prompt tokens served from the prefix cache"))}

    def load() -> WorkerLoad:
        """As of the engine's last message: answered at once, whatever step the engine is in."""
        if fe.load is None:
            raise HTTPException(503, "the engine has not reported yet")
        return WorkerLoad(**{**msgspec.structs.asdict(fe.load), "adapters": fe.adapters})

    @r.get("/health")
    async def health() -> dict:
        if fe.error is not None:
            raise HTTPException(503, f"engine failed: {fe.error}")
        return {"status": "ok"}

    @r.get("/ready")
    async def ready() -> dict:
        """Healthy and taking requests (not draining)."""
        if fe.draining:
            raise HTTPException(503, "draining: finishing the requests in flight")
        return await health()

    @r.get("/info")
    async def get_info() -> dict:
        return fe.hello.info

    @r.get("/tokenizer")
    async def tokenizer() -> dict:
        return fe.hello.tokenizer_files

    @r.get("/load")
    async def get_load() -> dict:
        return load().model_dump()

    async def _adapter(name: str, path: str | None) -> dict:
        try:
            fe.adapters = await fe.client.adapter(name, path)
        except RequestError as e:
            raise HTTPException(404 if path is None else 400, str(e)) from e
        except EngineDeadError as e:
            raise HTTPException(503, str(e)) from e
        return {"adapters": fe.adapters}

    @r.get("/adapters")
    async def adapters() -> dict:
        """The LoRA adapters served: name -> the root of their requests' block hash chains."""
        return {"adapters": fe.adapters}

    @r.post("/adapters")
    async def load_adapter(body: AdapterLoad) -> dict:
        """Serve a PEFT LoRA adapter folder (read and checked now: 400 with the reason if it cannot be)."""
        return await _adapter(body.name, body.path)

    @r.post("/adapters/{name}/unload")
    async def unload_adapter(name: str) -> dict:
        """New requests may no longer name it; those queued or running finish with it."""
        return await _adapter(name, None)

    @r.get("/metrics")
    async def metrics() -> Response:
        now = load()
        values = {"running": now.running, "waiting": now.waiting, "free_kv_blocks": now.free_blocks,
                  "total_kv_blocks": now.total_blocks, "tokens_computed": now.tokens_computed,
                  "prompt_tokens_cached": now.prompt_tokens_cached}
        for name, value in values.items():
            gauges[name].labels(**labels).set(value)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @r.get("/kv_events")
    async def kv_events(since: int = 0) -> dict:
        log = fe.events
        events = log.since(since)
        if events is None:  # the caller missed events: it gets the whole cache to start over from
            seq, hashes = log.snapshot()
            return {"instance": log.instance, "seq": seq, "resync": True, "block_hashes": hashes, "events": []}
        return {"instance": log.instance, "seq": log.seq, "resync": False,
                "events": [dict(seq=s, **e.to_dict()) for s, e in events]}

    return r
