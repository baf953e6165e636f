"""The interface every attention backend implements: plan once a step, then attend layer by layer."""

from typing import Protocol

import torch

from engine.attention.metadata import BatchMetadata


class AttentionBackend(Protocol):
    def plan(self, meta: BatchMetadata) -> None:
        """Prepare index tensors / kernel plans for this step; called once before the layers run."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's k, v into the paged cache of `layer` and attend.

        q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
        Returns [num_tokens, num_heads, head_dim].
        """
