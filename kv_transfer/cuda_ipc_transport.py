"""KV transfer between GPU pools of processes on one host through CUDA IPC: the receiver publishes an IPC
handle of its pool once; the sender maps it once and copies runs of adjacent blocks device to device.
"""

import base64
import pickle

import torch
from torch.multiprocessing.reductions import reduce_tensor

from kv_transfer.descriptors import PoolDescriptor, TransferError
from kv_transfer.local_transport import LocalTransport

PREFIX = "cuda-ipc:"


class CudaIpcTransport(LocalTransport):
    def _publish(self, pool: torch.Tensor, descriptor: PoolDescriptor) -> PoolDescriptor:
        if pool.device.type != "cuda":
            raise TransferError("the cuda_ipc transport moves GPU pools; use host for CPU pools")
        rebuild, args = reduce_tensor(pool)
        handle = base64.b64encode(pickle.dumps((rebuild, args))).decode()
        return PoolDescriptor(**(descriptor.to_dict() | {"address": PREFIX + handle}))

    def _map(self, peer: PoolDescriptor) -> torch.Tensor:
        if not peer.address.startswith(PREFIX):
            raise TransferError(f"peer {peer.agent} published no CUDA IPC handle")
        try:
            rebuild, args = pickle.loads(base64.b64decode(peer.address[len(PREFIX):]))  # noqa: S301 (our own peers)
            return rebuild(*args)
        except Exception as e:  # CUDA raises plain RuntimeErrors for a stale or foreign handle
            raise TransferError(f"cannot map {peer.agent}'s pool: {e}") from e

    def _finish(self) -> None:
        torch.cuda.current_stream(self.pool.device).synchronize()  # the KV has landed before we answer
