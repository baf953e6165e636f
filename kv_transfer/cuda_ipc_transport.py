"""KV transfer between GPU pools of processes on one host through CUDA IPC: the receiver publishes an IPC
handle of its pool once; the sender maps it once and copies runs of adjacent blocks device to device.
"""

import base64
import pickle

import torch
from torch.multiprocessing.reductions import reduce_tensor

from kv_transfer.descriptors import PoolDescriptor, TransferError, copy_runs

PREFIX = "cuda-ipc:"


class CudaIpcTransport:
    def __init__(self, agent: str):
        self.agent = agent
        self.pool: torch.Tensor | None = None
        self.descriptor: PoolDescriptor | None = None
        self.peers: dict[str, torch.Tensor] = {}

    def register_pool(self, pool: torch.Tensor, descriptor: PoolDescriptor) -> PoolDescriptor:
        if pool.device.type != "cuda":
            raise TransferError("the cuda_ipc transport moves GPU pools; use host for CPU pools")
        self.pool = pool
        rebuild, args = reduce_tensor(pool)
        handle = base64.b64encode(pickle.dumps((rebuild, args))).decode()
        fields = descriptor.to_dict() | {"address": PREFIX + handle}
        self.descriptor = PoolDescriptor(**fields)
        return self.descriptor

    def connect(self, peer: PoolDescriptor) -> None:
        if self.descriptor is None:
            raise TransferError("register this worker's pool before connecting to peers")
        self.descriptor.check_compatible(peer)
        if peer.agent in self.peers:
            return
        if not peer.address.startswith(PREFIX):
            raise TransferError(f"peer {peer.agent} published no CUDA IPC handle")
        try:
            rebuild, args = pickle.loads(base64.b64decode(peer.address[len(PREFIX):]))  # noqa: S301 (our own peers)
            self.peers[peer.agent] = rebuild(*args)
        except Exception as e:  # CUDA raises plain RuntimeErrors for a stale or foreign handle
            raise TransferError(f"cannot map {peer.agent}'s pool: {e}") from e

    def write_blocks(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int],
                     timeout_s: float = 30.0) -> None:
        dst = self.peers.get(peer)
        if dst is None:
            raise TransferError(f"not connected to {peer}")
        copy_runs(self.pool, dst, src_block_ids, dst_block_ids)
        torch.cuda.current_stream(self.pool.device).synchronize()  # the KV has landed before we answer

    def close(self) -> None:
        self.peers.clear()
