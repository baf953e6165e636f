"""Plain data that describes a pool to a peer, and the block runs a transfer moves."""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


WHOLE_BLOCKS_ONLY = ("this transport moves whole blocks: give prefill and decode workers the same tp_size "
                     "(or use the host transport, which also moves head slices)")


class TransferError(RuntimeError):
    """A transfer failed (peer gone, timeout, bad request); the caller frees its blocks and fails the request."""


class LayoutMismatchError(TransferError):
    """The two pools disagree on the KV layout: refused at handshake, before any byte moves."""


@dataclass(frozen=True, slots=True)
class PoolDescriptor:
    """What a peer needs to write into a pool: who, how, and the exact block layout."""

    agent: str  # the owning worker's name
    transport: str  # the workers offer "host" and "nixl"
    address: str  # transport-specific: a shared-memory file path, a NIXL agent metadata blob, ...
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int  # the heads this pool holds: [kv_head_start, kv_head_start + num_kv_heads) of the model's
    head_dim: int
    dtype: str
    kv_head_start: int = 0  # a tensor-parallel rank's first KV head
    total_kv_heads: int | None = None  # the model's KV heads; None: this pool holds them all

    @property
    def model_kv_heads(self) -> int:
        return self.total_kv_heads or self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PoolDescriptor":
        try:
            return cls(**d)
        except TypeError as e:
            raise LayoutMismatchError(f"malformed pool descriptor: {e}") from e

    def check_compatible(self, other: "PoolDescriptor") -> None:
        """The same model's KV in the same layout (each side may hold a different slice of its KV heads)."""
        for name in ("transport", "num_layers", "block_size", "model_kv_heads", "head_dim", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                shown = "num_kv_heads" if name == "model_kv_heads" else name
                raise LayoutMismatchError(f"KV layout mismatch with {other.agent}: {shown} {mine} != {theirs}")


@dataclass(frozen=True, slots=True)
class HeadSlice:
    """Part of a block's KV heads: `count` heads from the source pool's local head src_start to the
    destination pool's local head dst_start (pools of tensor-parallel ranks hold different heads)."""

    src_start: int
    dst_start: int
    count: int


def shard_plan(sources: list[PoolDescriptor], dests: list[PoolDescriptor]
               ) -> list[list[tuple[PoolDescriptor, HeadSlice | None]]]:
    """Which source rank writes which heads into which destination rank: for each source, a list of
    (destination, heads); heads is None where the two pools hold the same heads (whole blocks move).
    Every destination head comes from the first source rank holding it, so replicated heads move once."""
    plan: list[list[tuple[PoolDescriptor, HeadSlice | None]]] = [[] for _ in sources]
    for dest in dests:
        head, end = dest.kv_head_start, dest.kv_head_start + dest.num_kv_heads
        while head < end:
            i = next((i for i, s in enumerate(sources)
                      if s.kv_head_start <= head < s.kv_head_start + s.num_kv_heads), None)
            if i is None:
                raise TransferError(f"no source pool holds KV head {head} that {dest.agent} needs")
            src = sources[i]
            count = min(end, src.kv_head_start + src.num_kv_heads) - head
            same = count == src.num_kv_heads == dest.num_kv_heads
            plan[i].append((dest, None if same else HeadSlice(head - src.kv_head_start, head - dest.kv_head_start,
                                                               count)))
            head += count
    return plan


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
              dst_block_ids: list[int], heads: HeadSlice | None = None) -> int:
    """Copy blocks (all their heads, or a HeadSlice of them) between two pools mapped in this process, one
    copy per run; returns the run count. Pools are [blocks, layers, 2, block_size, kv_heads, head_dim]."""
    limit = dst_pool.shape[0] - 1  # the last block of a pool is scratch
    if any(b < 0 or b >= limit for b in dst_block_ids):
        raise TransferError(f"destination block ids out of range [0, {limit})")
    runs = block_runs(src_block_ids, dst_block_ids)
    if dst_pool.device.type == "cpu":
        _copy_host_runs(src_pool, dst_pool, runs, heads)
        return len(runs)
    for s, d, n in runs:
        src, dst = src_pool[s : s + n], dst_pool[d : d + n]
        if heads is not None:
            src = src[..., heads.src_start : heads.src_start + heads.count, :]
            dst = dst[..., heads.dst_start : heads.dst_start + heads.count, :]
        dst.copy_(src, non_blocking=True)
    return len(runs)


HOST_COPY_THREADS = min(8, os.cpu_count() or 1)
_host_copier: ThreadPoolExecutor | None = None


def _copy_host_runs(src_pool: "torch.Tensor", dst_pool: "torch.Tensor", runs: list[tuple[int, int, int]],
                    heads: HeadSlice | None) -> None:
    """CPU pools: the runs, cut into pieces, copied by numpy (which lets go of the GIL) on a few threads.
    Not torch's copy_: it spreads each copy over every core's OpenMP thread, and on a busy many-core host
    those threads spin against each other (0.25 GB/s measured on a 64-core host while compilers ran,
    against 42 GB/s for one large copy)."""
    global _host_copier
    import numpy as np
    import torch

    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[src_pool.element_size()]
    src, dst = src_pool.view(as_int).numpy(), dst_pool.view(as_int).numpy()  # numpy has no bfloat16
    if heads is not None:
        src = src[..., heads.src_start : heads.src_start + heads.count, :]
        dst = dst[..., heads.dst_start : heads.dst_start + heads.count, :]
    blocks = sum(n for _, _, n in runs)
    per = max(1, -(-blocks // (2 * HOST_COPY_THREADS)))  # about two tasks a thread, each ~`per` blocks
    tasks: list[list[tuple[int, int, int]]] = [[]]
    size = 0
    for s, d, n in runs:
        for k in range(0, n, per):
            m = min(per, n - k)
            if size + m > per and tasks[-1]:
                tasks.append([])
                size = 0
            tasks[-1].append((s + k, d + k, m))
            size += m

    def copy(pieces: list[tuple[int, int, int]]) -> None:
        for s, d, n in pieces:
            np.copyto(dst[d : d + n], src[s : s + n])

    if len(tasks) == 1 or blocks * src[0].nbytes < (4 << 20):  # small: threads cost more than they save
        for task in tasks:
            copy(task)
        return
    if _host_copier is None:
        _host_copier = ThreadPoolExecutor(HOST_COPY_THREADS, thread_name_prefix="kv-host-copy")
    for _ in _host_copier.map(copy, tasks):
        pass
