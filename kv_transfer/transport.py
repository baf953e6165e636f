"""The one interface every KV transport implements (host, NIXL, NCCL), chosen by configuration."""

from typing import Protocol

import torch

from kv_transfer.descriptors import HeadSlice, PoolDescriptor


class Transport(Protocol):
    def register_pool(self, pool: torch.Tensor, descriptor: PoolDescriptor) -> PoolDescriptor:
        """Register this worker's pool once; returns the descriptor peers connect with."""

    def connect(self, peer: PoolDescriptor) -> None:
        """Prepare to write into a peer's pool; raises LayoutMismatchError when layouts differ."""

    def write_blocks(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int],
                     timeout_s: float, heads: HeadSlice | None = None) -> None:
        """Copy blocks (all layers; all heads, or a slice of them between tensor-parallel pools that hold
        different heads) from this pool into the peer's; raises TransferError on failure."""

    def close(self) -> None:
        """Release registrations and mappings."""
