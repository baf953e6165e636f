"""KV transfer between CPU pools on one host: the receiving pool lives in a shared-memory file that the
sender maps once and writes into directly, one copy per run of adjacent blocks.
"""

import os
from pathlib import Path

import torch

from kv_transfer.descriptors import PoolDescriptor, TransferError, copy_runs

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


def shared_pool(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor backed by a shared-memory file (created here, mapped by peers)."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    with open(path, "wb") as f:
        f.truncate(nbytes)
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)


class HostTransport:
    def __init__(self, agent: str):
        self.agent = agent
        self.pool: torch.Tensor | None = None
        self.descriptor: PoolDescriptor | None = None
        self.peers: dict[str, torch.Tensor] = {}

    def register_pool(self, pool: torch.Tensor, descriptor: PoolDescriptor) -> PoolDescriptor:
        if pool.device.type != "cpu":
            raise TransferError("the host transport moves CPU pools; use nixl or nccl for GPU pools")
        self.pool, self.descriptor = pool, descriptor
        return descriptor

    def connect(self, peer: PoolDescriptor) -> None:
        if self.descriptor is None:
            raise TransferError("register this worker's pool before connecting to peers")
        self.descriptor.check_compatible(peer)
        if peer.agent in self.peers:
            return
        path = Path(peer.address)
        if not path.exists():
            raise TransferError(f"peer {peer.agent}'s pool {path} does not exist (is it on this host?)")
        shape = (peer.num_blocks + 1, *self.pool.shape[1:])  # peers keep one scratch block past the pool
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * self.pool.element_size()
        if os.path.getsize(path) != expected:
            raise TransferError(f"peer {peer.agent}'s pool file is {os.path.getsize(path)} bytes, not {expected}")
        self.peers[peer.agent] = torch.from_file(str(path), shared=True, size=numel, dtype=self.pool.dtype).view(shape)

    def write_blocks(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int],
                     timeout_s: float = 30.0) -> None:
        dst = self.peers.get(peer)
        if dst is None:
            raise TransferError(f"not connected to {peer}")
        copy_runs(self.pool, dst, src_block_ids, dst_block_ids)

    def close(self) -> None:
        self.peers.clear()
