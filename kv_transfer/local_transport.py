"""Transports between workers on one host that map the receiver's pool into the sender's process and copy
runs of adjacent blocks into it directly. Subclasses say how a pool is published and mapped: a
shared-memory file for CPU pools (host), a CUDA IPC handle for GPU pools (cuda_ipc)."""

import threading

import torch

from kv_transfer.descriptors import HeadSlice, PoolDescriptor, TransferError, check_peer, copy_runs


class LocalTransport:
    def __init__(self, agent: str):
        self.agent = agent
        self.pool: torch.Tensor | None = None
        self.descriptor: PoolDescriptor | None = None
        self.peers: dict[str, torch.Tensor] = {}
        self.addresses: dict[str, str] = {}  # agent -> the address its pool was mapped from
        self.retired: set[str] = set()  # addresses of peers that restarted since: their pools are gone
        self._lock = threading.Lock()  # connects come from several transfer threads

    def register_pool(self, pool: torch.Tensor, descriptor: PoolDescriptor) -> PoolDescriptor:
        self.pool = pool
        self.descriptor = self._publish(pool, descriptor)
        return self.descriptor

    def connect(self, peer: PoolDescriptor) -> None:
        check_peer(self.descriptor, peer)
        # A peer that restarted (the same name) publishes a new pool: the old mapping would write into the dead
        # process's memory, so it is replaced (and freed); a late request for the old one fails.
        with self._lock:
            if peer.address in self.retired:
                raise TransferError(f"peer {peer.agent} restarted: this request's blocks were in its old pool")
            old = self.addresses.get(peer.agent)
            if old != peer.address:
                self.peers[peer.agent] = self._map(peer)
                self.addresses[peer.agent] = peer.address
                if old is not None:
                    self.retired.add(old)

    def write_blocks(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int],
                     timeout_s: float = 30.0, heads: HeadSlice | None = None) -> None:
        dst = self.peers.get(peer)
        if dst is None:
            raise TransferError(f"not connected to {peer}")
        copy_runs(self.pool, dst, src_block_ids, dst_block_ids, heads)
        self._finish()

    def close(self) -> None:
        self.peers.clear()
        self.addresses.clear()

    # --- what differs between CPU and GPU pools ---

    def _publish(self, pool: torch.Tensor, descriptor: PoolDescriptor) -> PoolDescriptor:
        raise NotImplementedError

    def _map(self, peer: PoolDescriptor) -> torch.Tensor:
        raise NotImplementedError

    def _finish(self) -> None:
        """Make the copies visible to the peer before write_blocks returns."""
