"""KV transfer over torch.distributed point-to-point: NCCL between GPUs, gloo between CPU pools (same code).

The receiving worker hosts a TCPStore; each (sender, receiver) pair builds its own two-rank process group
from it (rank 0 sends, rank 1 receives), so workers can come and go without a global group. Unlike a
one-sided transport the receiver takes part: it posts a receive for every run of its reserved blocks, and
the sender sends each run as one message (gathering its own blocks into one buffer when they are not
adjacent).
"""

from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.descriptors import WHOLE_BLOCKS_ONLY, HeadSlice, PoolDescriptor, TransferError, check_peer


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in ids, first id, length) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(ids):
        if runs and b == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, b, 1))
    return runs


class DistTransport:
    def __init__(self, agent: str, backend: str = "nccl", host: str = "127.0.0.1", port: int = 0,
                 timeout_s: float = 30.0):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend must be nccl or gloo, got {backend!r}")
        self.agent, self.backend, self.host = agent, backend, host
        self.timeout = timedelta(seconds=timeout_s)
        self.store: dist.TCPStore | None = None
        self.port = port
        self.pool: torch.Tensor | None = None
        self.descriptor: PoolDescriptor | None = None
        self.groups: dict[str, dist.ProcessGroup] = {}

    def register_pool(self, pool: torch.Tensor, descriptor: PoolDescriptor) -> PoolDescriptor:
        self.pool = pool
        # The store peers rendezvous through; port 0 picks a free one.
        self.store = dist.TCPStore(self.host, self.port, is_master=True, wait_for_workers=False,
                                   timeout=self.timeout)
        fields = descriptor.to_dict() | {"address": f"{self.backend}://{self.host}:{self.store.port}"}
        self.descriptor = PoolDescriptor(**fields)
        return self.descriptor

    def _group(self, store: dist.Store, prefix: str, rank: int) -> dist.ProcessGroup:
        prefixed = dist.PrefixStore(prefix, store)
        if self.backend == "gloo":
            return dist.ProcessGroupGloo(prefixed, rank, 2, self.timeout)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = self.timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, options)

    def connect(self, peer: PoolDescriptor) -> None:
        """Sender side: join the pair's group through the receiver's store (blocks until it accepts)."""
        check_peer(self.descriptor, peer)
        if peer.agent in self.groups:
            return
        scheme, _, hostport = peer.address.partition("://")
        if scheme != self.backend:
            raise TransferError(f"peer {peer.agent} speaks {scheme!r}, this worker {self.backend!r}")
        host, _, port = hostport.rpartition(":")
        try:
            store = dist.TCPStore(host, int(port), is_master=False, timeout=self.timeout)
            self.groups[peer.agent] = self._group(store, f"{self.agent}->{peer.agent}", 0)
        except (RuntimeError, ValueError) as e:  # c10d raises DistStoreError/RuntimeError
            raise TransferError(f"cannot reach {peer.agent}'s store at {hostport}: {e}") from e

    def accept(self, peer_agent: str) -> None:
        """Receiver side: join the pair's group that a sender is connecting to."""
        if peer_agent not in self.groups:
            try:
                self.groups[peer_agent] = self._group(self.store, f"{peer_agent}->{self.agent}", 1)
            except RuntimeError as e:
                raise TransferError(f"{peer_agent} did not connect: {e}") from e

    def write_blocks(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int],
                     timeout_s: float = 30.0, heads: HeadSlice | None = None) -> None:
        if heads is not None:
            raise TransferError(WHOLE_BLOCKS_ONLY)
        group = self.groups.get(peer)
        if group is None:
            raise TransferError(f"not connected to {peer}")
        if len(src_block_ids) != len(dst_block_ids):
            raise TransferError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destination blocks")
        try:
            for pos, _, n in _runs(dst_block_ids):
                src = src_block_ids[pos : pos + n]
                if src == list(range(src[0], src[0] + n)):
                    buf = self.pool[src[0] : src[0] + n]
                else:  # gather this run's blocks into one message
                    buf = self.pool[torch.tensor(src, device=self.pool.device)]
                group.send([buf], 1, 0).wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:
            self.groups.pop(peer, None)
            raise TransferError(f"sending KV to {peer} failed: {e}") from e

    def receive_blocks(self, peer: str, dst_block_ids: list[int], timeout_s: float = 30.0) -> None:
        group = self.groups.get(peer)
        if group is None:
            raise TransferError(f"{peer} has not connected")
        limit = self.pool.shape[0] - 1
        if any(b < 0 or b >= limit for b in dst_block_ids):
            raise TransferError(f"destination block ids out of range [0, {limit})")
        try:
            for _, first, n in _runs(dst_block_ids):
                group.recv([self.pool[first : first + n]], 0, 0).wait(timedelta(seconds=timeout_s))
        except RuntimeError as e:
            self.groups.pop(peer, None)
            raise TransferError(f"receiving KV from {peer} failed: {e}") from e

    def close(self) -> None:
        self.groups.clear()
