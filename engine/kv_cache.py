"""The paged KV cache tensor: one allocation, block-major so that a block of every layer is contiguous.

Layout [num_blocks, num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]: a request's KV is a list of
whole blocks, each one contiguous span of `block_bytes`, so a transfer needs one descriptor per run of
adjacent block ids rather than one per layer and block.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

# (shape, dtype) -> a zeroed tensor; lets a worker place the pool where its KV transport can reach it.
KVAllocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Plain data both sides of a KV transfer must agree on."""

    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "bfloat16"

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        elem = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        n = 1
        for d in self.block_shape:
            n *= d
        return n * elem


class KVCache:
    def __init__(self, layout: KVLayout, device: torch.device | str, allocate: KVAllocator | None = None):
        self.layout = layout
        self.block_size = layout.block_size
        # One block past the pool's is scratch: padded rows of a CUDA-graph batch write there, nothing reads it.
        self.scratch_block = layout.num_blocks
        shape, dtype = (layout.num_blocks + 1, *layout.block_shape), getattr(torch, layout.dtype)
        self.tensor = allocate(shape, dtype) if allocate else torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided views of one layer's keys and values: [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.tensor[:, layer, 0], self.tensor[:, layer, 1]
