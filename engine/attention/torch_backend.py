"""The reference attention backend: paged KV gathered with tensor indexing, then PyTorch SDPA.

Exact and portable (CPU or GPU); slow for long contexts because it materialises each request's KV.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.attention.metadata import BatchMetadata
from engine.kv_cache import KVCache

_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class TorchAttention:
    def __init__(self, kv_cache: KVCache, num_heads: int, head_dim: int, windows: list[int] | None = None):
        """windows: each layer's sliding window (0: none; None: no layer slides)."""
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.windows = windows or [0] * kv_cache.layout.num_layers
        self.masks: dict[int, torch.Tensor] = {}
        self.scale = head_dim**-0.5
        self._meta: BatchMetadata | None = None

    def plan(self, meta: BatchMetadata) -> None:
        device = meta.seq_lens.device
        block_size = self.kv_cache.block_size
        starts = meta.query_start_loc[:-1]
        query_lens = meta.query_start_loc[1:] - starts
        # Padded query positions: [num_seqs, max_q]; row b holds tokens starts[b] .. starts[b]+query_lens[b]-1.
        q_arange = torch.arange(meta.max_query_len, device=device)
        self.q_valid = q_arange[None, :] < query_lens[:, None]
        self.q_index = torch.where(self.q_valid, starts[:, None] + q_arange[None, :], 0)
        q_pos = (meta.seq_lens - query_lens)[:, None] + q_arange[None, :]  # absolute position of each query
        # Padded KV positions: [num_seqs, max_kv] -> (block, offset) through the block table.
        kv_pos = torch.arange(meta.max_seq_len, device=device)
        self.kv_blocks = meta.block_tables.gather(1, (kv_pos // block_size)[None, :].expand(meta.num_seqs, -1))
        self.kv_offsets = (kv_pos % block_size)[None, :].expand(meta.num_seqs, -1)
        # [num_seqs, 1, max_q, max_kv]: causal within the request, padding rows see key 0 (result discarded);
        # a sliding layer's query sees the keys after q_pos - window too (transformers' sliding_window_overlay).
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < meta.seq_lens[:, None, None])
        padding = ~self.q_valid[:, :, None]
        self.masks = {w: ((mask & (kv_pos[None, None, :] > q_pos[:, :, None] - w) if w else mask) | padding)
                      .unsqueeze(1) for w in set(self.windows)}
        self._meta = meta

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self._meta
        k_cache, v_cache = self.kv_cache.layer(layer)  # each [num_blocks, block_size, kv_heads, head_dim]
        k_cache[meta.slot_blocks, meta.slot_offsets] = k.to(k_cache.dtype)
        v_cache[meta.slot_blocks, meta.slot_offsets] = v.to(v_cache.dtype)
        qp = q[self.q_index].transpose(1, 2)  # [num_seqs, heads, max_q, head_dim]
        kp = k_cache[self.kv_blocks, self.kv_offsets].transpose(1, 2).to(q.dtype)  # [num_seqs, kv_heads, max_kv, d]
        vp = v_cache[self.kv_blocks, self.kv_offsets].transpose(1, 2).to(q.dtype)
        # Not cuDNN: it builds a new execution plan (~16 ms of host time, seen on an H200) for every new shape.
        with sdpa_kernel(_BACKENDS):
            out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=self.masks[self.windows[layer]], scale=self.scale,
                                                 enable_gqa=kp.shape[1] != qp.shape[1])
        return out.transpose(1, 2)[self.q_valid]  # back to packed [num_tokens, heads, head_dim]
