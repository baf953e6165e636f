"""The admin API (behind the admin token): API keys and usage. `pdserve keys ...` is its CLI."""

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

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
    return {"url": w.url, "name": w.info.name if w.info else None, "role": w.role, "healthy": w.healthy,
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
