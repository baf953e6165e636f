"""KV cache events a worker reports so routers can track which blocks it holds (DESIGN.md)."""

from dataclasses import dataclass
from enum import StrEnum


class KVEventKind(StrEnum):
    STORED = "stored"  # in the worker's device pool (again, if it had moved down)
    OFFLOADED = "offloaded"  # moved from the device pool to a lower tier of the same worker (host, disk): still held
    REMOVED = "removed"  # gone from every tier of the worker
    CLEARED = "cleared"


@dataclass(frozen=True, slots=True)
class KVEvent:
    kind: KVEventKind
    block_hashes: tuple[int, ...] = ()
    parent_hash: int | None = None  # for STORED: the hash the first block chains from

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "block_hashes": list(self.block_hashes), "parent_hash": self.parent_hash}

    @classmethod
    def from_dict(cls, d: dict) -> "KVEvent":
        return cls(KVEventKind(d["kind"]), tuple(d.get("block_hashes", ())), d.get("parent_hash"))
