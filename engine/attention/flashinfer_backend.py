"""FlashInfer attention on CUDA: paged decode, and prefill of new tokens against the paged (cached) KV.

Planned once a step; each layer's cache is a strided view of the block-major pool
([num_blocks, 2, block_size, kv_heads, head_dim] with the block stride of all layers), so no copy.
"""

import torch

from engine.attention.metadata import BatchMetadata
from engine.errors import UnsupportedModelError
from engine.kv_cache import KVCache

WORKSPACE_BYTES = 256 << 20


class FlashInferAttention:
    def __init__(self, kv_cache: KVCache, num_heads: int, num_kv_heads: int, head_dim: int,
                 q_dtype: torch.dtype | None = None, windows: list[int] | None = None):
        """num_heads, num_kv_heads: this rank's (all of them without tensor parallelism); q_dtype: the queries'
        (default: the pool's; an FP8 pool's queries are bf16); windows: each layer's sliding window (0: none),
        one for all layers (a plan serves every layer)."""
        if windows and len(set(windows)) > 1:
            raise UnsupportedModelError("layers with different attention windows need the torch attention backend")
        # FlashInfer's window_left counts the keys left of the query: a window of w positions is w - 1 of them.
        self.window_left = windows[0] - 1 if windows and windows[0] else -1
        from engine.fused import flashinfer as import_flashinfer

        flashinfer = self.flashinfer = import_flashinfer()
        self.kv_cache = kv_cache
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype = kv_cache.tensor.dtype
        self.q_dtype = q_dtype or self.dtype
        # Rotary and the KV write in one kernel (engine/fused.py) only where the pool holds the queries' dtype.
        self.store_rotated = self.q_dtype == self.dtype
        device = kv_cache.tensor.device
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores)
        self._wrapper = self.decode
        self._meta: BatchMetadata | None = None
        # A plan fills a pinned host buffer and queues its copy to the device; with steps queued ahead of
        # the device (overlapped scheduling), the next plan must not refill that buffer before the copy ran.
        self._planned = torch.cuda.Event() if device.type == "cuda" else None

    @property
    def use_tensor_cores(self) -> bool:
        return self.num_heads // self.num_kv_heads >= 4

    def plan(self, meta: BatchMetadata, wrapper=None) -> None:
        heads = (self.num_heads, self.num_kv_heads, self.head_dim)
        if self._planned is not None:
            self._planned.synchronize()  # the previous plan's copy (queued right after the step before it)
        if meta.is_decode_only:
            self._wrapper = wrapper or self.decode
            self._wrapper.plan(meta.kv_indptr_host, meta.kv_indices, meta.kv_last_page_len_host, *heads,
                               self.kv_cache.block_size, pos_encoding_mode="NONE",
                               window_left=self.window_left, q_data_type=self.q_dtype, kv_data_type=self.dtype)
        else:
            self._wrapper = self.prefill
            self.prefill.plan(meta.query_start_loc_host, meta.kv_indptr_host, meta.kv_indices,
                              meta.kv_last_page_len_host, *heads, self.kv_cache.block_size, causal=True,
                              pos_encoding_mode="NONE", window_left=self.window_left, q_data_type=self.q_dtype,
                              kv_data_type=self.dtype)
        if self._planned is not None:
            self._planned.record()
        self._meta = meta

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self._meta
        cache = self.kv_cache.tensor[:, layer]  # [num_blocks, 2, block_size, kv_heads, head_dim], strided
        kv = _side_by_side(k, v)
        if kv is not None:  # one write of both (k and v are adjacent views into the qkv projection)
            cache[meta.slot_blocks, :, meta.slot_offsets] = kv.to(self.dtype)
        else:
            cache[meta.slot_blocks, 0, meta.slot_offsets] = k.to(self.dtype)
            cache[meta.slot_blocks, 1, meta.slot_offsets] = v.to(self.dtype)
        return self._wrapper.run(q.contiguous(), cache)  # q may be a view into qkv (one copy if so)

    def forward_rotating(self, layer: int, qkv: torch.Tensor, positions: torch.Tensor,
                         cos_sin: torch.Tensor) -> torch.Tensor:
        """forward() from the unrotated qkv projection [T, (heads + 2 kv_heads) * head_dim]: rotary and the KV
        write in one kernel (engine.fused.rotate_and_store_, which writes the rotated query out contiguous), then
        attention."""
        from engine import fused

        meta, h, kvh, d = self._meta, self.num_heads, self.num_kv_heads, self.head_dim
        cache = self.kv_cache.tensor[:, layer]
        q = qkv.new_empty(qkv.shape[0], h, d)
        fused.rotate_and_store_(qkv, positions, cos_sin, cache, meta.slot_blocks, meta.slot_offsets, h, kvh, d, q)
        return self._wrapper.run(q, cache)


def _side_by_side(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """[T, 2, kv_heads, head_dim] over k and v when v lies at a fixed offset from k in the same rows, else None."""
    if k.shape != v.shape or k.stride() != v.stride() or k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr():
        return None
    gap = v.storage_offset() - k.storage_offset()
    if gap <= 0:
        return None
    t, heads, d = k.shape
    return k.as_strided((t, 2, heads, d), (k.stride(0), gap, k.stride(1), k.stride(2)), k.storage_offset())
