"""The admin API (behind the admin token): API keys and usage (`pdserve keys ...` is their CLI), the pools'
sizes and advice, and LoRA adapters."""

import asyncio
import json
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from protocol.stream_client import StatusError
from router.errors import OpenAIError
from router.keys import new_key
from router.scaling import POOLS, advise

if TYPE_CHECKING:
    from router.app import RouterState


class PoolScale(BaseModel):
    replicas: int = Field(strict=True, ge=0, le=1024, description="the desired number of workers in the pool")


class KeyUpdate(BaseModel):
    enabled: bool | None = None
    models: list[str] | None = None
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    priority: int = Field(default=0, ge=-1000, le=1000)  # (applied only when given; null is refused)


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    models: list[str] = Field(default_factory=lambda: ["*"])
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    priority: int = Field(default=0, ge=-1000, le=1000)  # lower first


class AdapterLoad(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[^:/\s]+$",
                      description="the model name requests use (also as `model:name`)")
    path: str = Field(min_length=1, description="a PEFT LoRA adapter folder, as the workers see their volume")
    model: str | None = Field(default=None, description="the base model it was trained on (default: the first)")


def _reason(error: BaseException) -> str:
    """A worker's refusal as it worded it (its JSON `detail`), else the error."""
    if isinstance(error, StatusError):
        text = str(error).split(": ", 1)[-1]
        try:
            return json.loads(text)["detail"]
        except (ValueError, KeyError, TypeError):
            return text
    return f"{type(error).__name__}: {error}"


def admin_routes(state: "RouterState") -> APIRouter:
    r = APIRouter(prefix="/admin")
    door = state.door

    @r.post("/keys", status_code=201)
    async def create_key(body: KeyCreate, request: Request) -> dict:
        door.check_admin(request.headers.get("authorization"))
        key, record = new_key(body.name, body.models, body.rpm, body.tpm, body.max_concurrent, body.priority)
        await door.keys.put(record)
        return {**record.public(), "key": key}  # the only time the key is shown

    @r.get("/keys")
    async def list_keys(request: Request) -> dict:
        door.check_admin(request.headers.get("authorization"))
        return {"data": [k.public() for k in sorted(await door.keys.all(), key=lambda k: k.created)]}

    @r.patch("/keys/{key_id}")
    async def update_key(key_id: str, body: KeyUpdate, request: Request) -> dict:
        """Enable/disable a key or change its models and limits (takes effect within a second)."""
        door.check_admin(request.headers.get("authorization"))
        record = await door.keys.by_id(key_id)
        if record is None:
            raise OpenAIError(404, f"no API key with id {key_id!r}", param="key_id", code="key_not_found")
        for name, value in body.model_dump(exclude_unset=True).items():
            setattr(record, name, value)
        await door.keys.put(record)
        return record.public()

    @r.delete("/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request) -> dict:
        door.check_admin(request.headers.get("authorization"))
        if not await door.keys.remove(key_id):
            raise OpenAIError(404, f"no API key with id {key_id!r}", param="key_id", code="key_not_found")
        return {"id": key_id, "revoked": True}

    @r.get("/usage")
    async def usage(request: Request, key_id: str | None = None, hours: int = 24) -> dict:
        door.check_admin(request.headers.get("authorization"))
        if not 1 <= hours <= 24 * 90:
            raise OpenAIError(400, "hours must be in [1, 2160]", param="hours")
        return {"data": await door.usage.report(key_id, hours)}

    def _pool(name: str) -> str:
        if name not in POOLS:
            raise OpenAIError(404, f"no pool {name!r}: prefill or decode", param="pool", code="pool_not_found")
        return name

    @r.get("/pools/{pool}")
    async def get_pool(pool: str, request: Request) -> dict:
        door.check_admin(request.headers.get("authorization"))
        return await pool_view(state, _pool(pool))

    @r.put("/pools/{pool}", status_code=202)
    async def put_pool(pool: str, body: PoolScale, request: Request) -> JSONResponse:
        """Resize a pool; returns at once (202) while workers start, or drain and stop."""
        door.check_admin(request.headers.get("authorization"))
        pool = _pool(pool)
        if state.scaler is None:
            raise OpenAIError(409, "this router cannot resize its pools (a static worker list): use pdserve serve "
                                   "or Kubernetes", code="scaling_unavailable")
        if pool == "decode" and body.replicas < 1:
            raise OpenAIError(400, "the decode pool needs at least one worker", param="replicas",
                              code="invalid_replicas")
        if body.replicas > state.config.max_pool_replicas:
            raise OpenAIError(400, f"at most {state.config.max_pool_replicas} workers a pool", param="replicas",
                              code="invalid_replicas")
        await state.scaler.scale(pool, body.replicas)
        return JSONResponse(await pool_view(state, pool), status_code=202)

    @r.get("/adapters")
    async def list_adapters(request: Request) -> dict:
        """The LoRA adapters served, and which workers serve each."""
        door.check_admin(request.headers.get("authorization"))
        pool = state.pool
        return {"data": [{"name": name, "model": model, "path": pool.adapter_paths.get(name, (None, None))[1],
                          "workers": [w.url for w in pool.workers if w.healthy and w.load is not None
                                      and w.info is not None and w.info.model == model and name in w.load.adapters]}
                         for model in pool.references for name in sorted(pool.adapters(model))]}

    @r.post("/adapters", status_code=201)
    async def load_adapter(body: AdapterLoad, request: Request) -> dict:
        """Every worker serves the adapter (and workers that join later): all or none (400 with a worker's
        reason, and the ones that loaded it unload it)."""
        door.check_admin(request.headers.get("authorization"))
        pool = state.pool
        model = body.model or (pool.reference.model if pool.reference else None)
        if model not in pool.references:
            raise OpenAIError(404, f"no model {model!r} is served", param="model", code="model_not_found")
        if body.name in pool.references or any(body.name in pool.adapters(m) for m in pool.references if m != model):
            raise OpenAIError(400, f"{body.name!r} already names a model or another model's adapter", param="name")
        workers = [w for w in pool.workers if w.healthy and w.info is not None and w.info.model == model]
        if not workers:
            raise OpenAIError(503, f"no healthy worker of {model} to load the adapter", code="no_healthy_worker")
        results = await asyncio.gather(*(pool.load_adapter(w, body.name, body.path) for w in workers),
                                       return_exceptions=True)
        failed = [(w, e) for w, e in zip(workers, results, strict=True) if isinstance(e, BaseException)]
        if failed:
            await asyncio.gather(*(pool.load_adapter(w, body.name, None)
                                   for w, e in zip(workers, results, strict=True) if e is None), return_exceptions=True)
            w, e = failed[0]
            raise OpenAIError(400, f"adapter {body.name!r} not loaded: {w.url}: {_reason(e)}", param="path",
                              code="adapter_load_failed")
        pool.adapter_paths[body.name] = (model, body.path)
        return {"name": body.name, "model": model, "path": body.path, "workers": [w.url for w in workers]}

    @r.delete("/adapters/{name}")
    async def unload_adapter(name: str, request: Request) -> dict:
        """No new request may name it; those in flight finish with it."""
        door.check_admin(request.headers.get("authorization"))
        pool = state.pool
        pool.adapter_paths.pop(name, None)
        serving = [w for w in pool.workers if w.load is not None and name in w.load.adapters]
        if not serving:
            raise OpenAIError(404, f"no adapter {name!r} is served", param="name", code="adapter_not_found")
        results = await asyncio.gather(*(pool.load_adapter(w, name, None) for w in serving), return_exceptions=True)
        errors = [f"{w.url}: {_reason(e)}" for w, e in zip(serving, results, strict=True)
                  if isinstance(e, Exception)]
        return {"name": name, "workers": [w.url for w in serving], "errors": errors}

    @r.get("/advice")
    async def get_advice(request: Request) -> dict:
        door.check_admin(request.headers.get("authorization"))
        return advice(state)

    return r


def advice(state: "RouterState") -> dict:
    c = state.config
    out = advise(state.pool, state.telemetry, c.ttft_slo_s or 2.0, c.itl_slo_s)
    for role, a in out.items():
        state.metrics.recommended_workers.labels(role).set(a["recommended"])
    return out


def worker_view(w) -> dict:
    ld = w.load
    return {"url": w.url, "name": w.info.name if w.info else None, "model": w.info.model if w.info else None,
            "role": w.role, "healthy": w.healthy,
            "draining": w.draining, "restarts": w.restarts, "inflight": w.inflight,
            "running": ld.running if ld else None, "waiting": ld.waiting if ld else None,
            "kv_used": (ld.total_blocks - ld.free_blocks) if ld else None, "kv_total": ld.total_blocks if ld else None,
            "kv_host_used": ld.host_blocks if ld else None, "kv_host_total": ld.host_blocks_total if ld else None,
            "host_hit_ratio": (ld.host_hit_tokens / ld.prompt_tokens) if ld and ld.prompt_tokens else None,
            "hit_ratio": (ld.prompt_tokens_cached / ld.prompt_tokens) if ld and ld.prompt_tokens else None,
            "tokens_per_s": round(w.tokens_per_s, 1), "kv_gb_per_s": round(w.kv_bytes_per_s / 1e9, 3),
            "tokens_computed": ld.tokens_computed if ld else None}


async def pool_view(state: "RouterState", pool: str) -> dict:
    workers = [w for w in state.pool.workers if w.role == pool]
    desired = await state.scaler.replicas(pool) if state.scaler is not None else len(workers)
    return {"pool": pool, "replicas": desired, "healthy": len(state.pool.pool(pool)),
            "scalable": state.scaler is not None, "workers": [worker_view(w) for w in workers]}
