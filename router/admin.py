"""The admin API (behind the admin token): API keys and usage. `pdserve keys ...` is its CLI."""

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from router.errors import OpenAIError
from router.keys import new_key

if TYPE_CHECKING:
    from router.app import RouterState


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    models: list[str] = Field(default_factory=lambda: ["*"])
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)


def admin_routes(state: "RouterState") -> APIRouter:
    r = APIRouter(prefix="/admin")
    door = state.door

    @r.post("/keys", status_code=201)
    async def create_key(body: KeyCreate, request: Request) -> dict:
        door.check_admin(request.headers.get("authorization"))
        key, record = new_key(body.name, body.models, body.rpm, body.tpm, body.max_concurrent)
        await door.keys.put(record)
        return {**record.public(), "key": key}  # the only time the key is shown

    @r.get("/keys")
    async def list_keys(request: Request) -> dict:
        door.check_admin(request.headers.get("authorization"))
        return {"data": [k.public() for k in sorted(await door.keys.all(), key=lambda k: k.created)]}

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

    return r
