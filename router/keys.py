"""API keys: stored hashed (sha256), each with a name, allowed models, limits and an enabled flag.

A key reads `pds-<id>-<secret>`; only its hash is stored, under which the record is found. The id is public
(it names the key in the admin API, usage and metrics); the secret is shown once, when the key is created.
Cluster mode keeps keys in Redis, so every router replica sees the same ones; embedded mode keeps them in a
JSON file. Lookups are cached for at most `cache_s` (0.5 s), so a revoked key stops working on every router
within a second.
"""

import asyncio
import hashlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class ApiKey:
    id: str
    name: str
    key_hash: str
    models: list[str] = field(default_factory=lambda: ["*"])  # "*": every model
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute (prompt + max output, reserved at admission)
    max_concurrent: int | None = None
    enabled: bool = True
    created: float = 0.0
    priority: int = 0  # its requests' scheduling priority (lower first); a request may ask for a higher value only

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    @classmethod
    def load(cls, record: dict) -> "ApiKey":
        """A stored record; fields this version does not know (a newer router's) are ignored."""
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})

    def public(self) -> dict:
        """What the admin API shows: everything but the hash."""
        d = asdict(self)
        d.pop("key_hash")
        return d


def new_key(name: str, models: list[str] | None = None, rpm: int | None = None, tpm: int | None = None,
            max_concurrent: int | None = None, priority: int = 0) -> tuple[str, ApiKey]:
    """(the key in clear, shown once; its record)"""
    if not name or len(name) > 64:
        raise ValueError("a key needs a name of 1 to 64 characters")
    for label, v in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)):
        if v is not None and v < 1:
            raise ValueError(f"{label} must be at least 1")
    key_id = secrets.token_hex(6)
    key = f"pds-{key_id}-{secrets.token_urlsafe(24)}"
    return key, ApiKey(key_id, name, hash_key(key), models or ["*"], rpm, tpm, max_concurrent, True, time.time(),
                       priority)


class _Cached:
    def __init__(self, cache_s: float):
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}

    async def lookup(self, h: str) -> ApiKey | None:
        """The enabled record of a key, by its hash (`hash_key`), or None."""
        now = time.monotonic()
        hit = self._cache.get(h)
        if hit is None or now - hit[0] > self.cache_s:
            if len(self._cache) > 100_000:  # bounded: random keys from an attacker must not grow it forever
                self._cache.clear()
            hit = (now, await self._get(h))
            self._cache[h] = hit
        record = hit[1]
        return record if record is not None and record.enabled else None

    async def _get(self, key_hash: str) -> ApiKey | None:
        raise NotImplementedError

    async def all(self) -> list[ApiKey]:
        raise NotImplementedError

    async def by_id(self, key_id: str) -> ApiKey | None:
        return next((k for k in await self.all() if k.id == key_id), None)


class RedisKeyStore(_Cached):
    def __init__(self, redis, namespace: str, cache_s: float = 0.5):
        super().__init__(cache_s)
        self.redis, self.key = redis, f"{namespace}:keys"

    async def _get(self, key_hash: str) -> ApiKey | None:
        raw = await self.redis.hget(self.key, key_hash)
        return ApiKey.load(json.loads(raw)) if raw else None

    async def put(self, record: ApiKey) -> None:
        await self.redis.hset(self.key, record.key_hash, json.dumps(asdict(record)))

    async def all(self) -> list[ApiKey]:
        return [ApiKey.load(json.loads(v)) for v in (await self.redis.hgetall(self.key)).values()]

    async def remove(self, key_id: str) -> bool:
        record = await self.by_id(key_id)
        return record is not None and bool(await self.redis.hdel(self.key, record.key_hash))


class FileKeyStore(_Cached):
    """Embedded mode: one JSON file ({hash: record}), rewritten atomically on change."""

    def __init__(self, path: str | Path, cache_s: float = 0.5):
        super().__init__(cache_s)
        self.path = Path(path)
        self._lock = asyncio.Lock()

    def _read(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def _write(self, records: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.chmod(0o600)
        tmp.replace(self.path)

    async def _get(self, key_hash: str) -> ApiKey | None:
        raw = self._read().get(key_hash)
        return ApiKey.load(raw) if raw else None

    async def put(self, record: ApiKey) -> None:
        async with self._lock:
            records = self._read()
            records[record.key_hash] = asdict(record)
            self._write(records)

    async def all(self) -> list[ApiKey]:
        return [ApiKey.load(v) for v in self._read().values()]

    async def remove(self, key_id: str) -> bool:
        async with self._lock:
            records = self._read()
            left = {h: r for h, r in records.items() if r["id"] != key_id}
            if len(left) == len(records):
                return False
            self._write(left)
            return True
