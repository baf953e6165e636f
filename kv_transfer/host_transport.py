"""KV transfer between CPU pools on one host: the receiving pool lives in a shared-memory file that the
sender maps once and writes into directly, one copy per run of adjacent blocks.
"""

import os
from pathlib import Path

import torch

from kv_transfer.descriptors import PoolDescriptor, TransferError
from kv_transfer.local_transport import LocalTransport

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shared_pool(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor backed by a shared-memory file (created here, mapped by peers)."""
    with open(path, "wb") as f:
        f.truncate(_numel(shape) * torch.empty((), dtype=dtype).element_size())
    return torch.from_file(str(path), shared=True, size=_numel(shape), dtype=dtype).view(shape)


class HostTransport(LocalTransport):
    def _publish(self, pool: torch.Tensor, descriptor: PoolDescriptor) -> PoolDescriptor:
        if pool.device.type != "cpu":
            raise TransferError("the host transport moves CPU pools; use cuda_ipc or nixl for GPU pools")
        return descriptor  # the address is the pool's shared-memory file, chosen by whoever allocated it

    def _map(self, peer: PoolDescriptor) -> torch.Tensor:
        path = Path(peer.address)
        if not path.exists():
            raise TransferError(f"peer {peer.agent}'s pool {path} does not exist (is it on this host?)")
        # Peers keep one scratch block past the pool; a tensor-parallel peer holds its own number of heads.
        shape = (peer.num_blocks + 1, peer.num_layers, 2, peer.block_size, peer.num_kv_heads, peer.head_dim)
        expected = _numel(shape) * self.pool.element_size()
        if os.path.getsize(path) != expected:
            raise TransferError(f"peer {peer.agent}'s pool file is {os.path.getsize(path)} bytes, not {expected}")
        return torch.from_file(str(path), shared=True, size=_numel(shape), dtype=self.pool.dtype).view(shape)
