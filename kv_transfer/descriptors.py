"""Plain data that describes a pool to a peer, and the block runs a transfer moves."""

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class TransferError(RuntimeError):
    """A transfer failed (peer gone, timeout, bad request); the caller frees its blocks and fails the request."""


class LayoutMismatchError(TransferError):
    """The two pools disagree on the KV layout: refused at handshake, before any byte moves."""


@dataclass(frozen=True, slots=True)
class PoolDescriptor:
    """What a peer needs to write into a pool: who, how, and the exact block layout."""

    agent: str  # the owning worker's name
    transport: str  # "host", "nixl", "nccl"
    address: str  # transport-specific: a shared-memory file path, a NIXL agent metadata blob, ...
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PoolDescriptor":
        try:
            return cls(**d)
        except TypeError as e:
            raise LayoutMismatchError(f"malformed pool descriptor: {e}") from e

    def check_compatible(self, other: "PoolDescriptor") -> None:
        for name in ("transport", "num_layers", "block_size", "num_kv_heads", "head_dim", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise LayoutMismatchError(f"KV layout mismatch with {other.agent}: {name} {mine} != {theirs}")


def check_peer(own: PoolDescriptor | None, peer: PoolDescriptor) -> None:
    """Before any connection: this worker's pool is registered and the peer's layout matches it."""
    if own is None:
        raise TransferError("register this worker's pool before connecting to peers")
    own.check_compatible(peer)


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Coalesce (src, dst) block pairs into runs (src_start, dst_start, length) contiguous on both sides."""
    if len(src) != len(dst):
        raise TransferError(f"{len(src)} source blocks for {len(dst)} destination blocks")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_runs(src_pool: "torch.Tensor", dst_pool: "torch.Tensor", src_block_ids: list[int],
              dst_block_ids: list[int]) -> int:
    """Copy whole blocks between two pools mapped in this process, one copy per run; returns the run count."""
    limit = dst_pool.shape[0] - 1  # the last block of a pool is scratch
    if any(b < 0 or b >= limit for b in dst_block_ids):
        raise TransferError(f"destination block ids out of range [0, {limit})")
    runs = block_runs(src_block_ids, dst_block_ids)
    for s, d, n in runs:
        dst_pool[d : d + n].copy_(src_pool[s : s + n], non_blocking=True)
    return len(runs)
