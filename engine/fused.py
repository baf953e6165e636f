"""Fused kernels for the small ops of a GPU forward: residual add + RMSNorm, SiLU-and-mul, rotary (FlashInfer's),
and rotary fused with the KV-cache write (Triton).

A decode step of an 8B model reads 15 GB of weights in ~4 ms; the ~20 small kernels a layer around the
matmuls (norms as two kernels, rotary as five, the residual adds) cost ~1.4 ms more on an H200 at batch 1.
Each op here is one kernel. They are used with the FlashInfer attention backend (CUDA, bf16/fp16); the
PyTorch path in engine/layers.py stays the reference (same math as transformers, step by step).

Numerics: each kernel computes in float32 and rounds once, where transformers rounds after every op in
bf16, so outputs differ by bf16 rounding (the GPU tests compare within tolerance). FlashInfer builds these
kernels on first use (~1-2 min, cached in ~/.cache/flashinfer); warm_up() builds them in parallel.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

# FlashInfer's norms come as CUDA JIT kernels and as CuTe-DSL ones (those need nvidia-cutlass-dsl): the former.
os.environ.setdefault("FLASHINFER_USE_CUDA_NORM", "1")


def flashinfer():
    import flashinfer as fi

    return fi


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x, then x = rmsnorm(residual) * weight."""
    flashinfer().norm.fused_add_rmsnorm(x, residual, weight, eps)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, dim] or [T, heads, dim] -> rmsnorm(x) * weight."""
    return flashinfer().norm.rmsnorm(x, weight, eps)


# Batches of at most this many tokens take the Triton SiLU-and-mul (silu_and_mul_wide) instead of FlashInfer's,
# which runs one thread block a token: at batch 1, one block for Llama-3-8B's 14,336 columns (~4.7 us a layer
# on an H200). 0: off until measured (bench.profile_decode --compare-act).
WIDE_ACT_MAX_TOKENS = 0
_act = None


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2n] (gate | up) -> silu(gate) * up [T, n]."""
    if gate_up.shape[0] <= WIDE_ACT_MAX_TOKENS:
        return silu_and_mul_wide(gate_up)
    return flashinfer().activation.silu_and_mul(gate_up)


def silu_and_mul_wide(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The same as one Triton kernel spread over column blocks too (tokens x n / block programs), float32
    inside and rounded once, like FlashInfer's."""
    global _act
    if _act is None:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(x, out, n, x_stride, out_stride, BLOCK: tl.constexpr):
            t = tl.program_id(0)
            i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            m = i < n
            g = tl.load(x + t * x_stride + i, mask=m).to(tl.float32)
            u = tl.load(x + t * x_stride + n + i, mask=m).to(tl.float32)
            tl.store(out + t * out_stride + i, (g / (1.0 + tl.exp(-g)) * u).to(out.dtype.element_ty), mask=m)

        _act = (kernel, triton.cdiv)
    kernel, cdiv = _act
    if gate_up.stride(1) != 1:
        raise ValueError("silu_and_mul_wide needs contiguous rows")
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(t, n)
    if t:
        kernel[(t, cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=block)
    return out


def rotate_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_dim: int,
            cos_sin: torch.Tensor) -> None:
    """Rotate q [T, heads(*head_dim)] and k in place (strided views into the qkv projection are fine);
    cos_sin: float32 [max_positions, head_dim], cos of the half-dimension frequencies | their sin."""
    flashinfer().rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, head_dim, cos_sin, is_neox=True)


# Rotary and the KV write as one Triton kernel (rotate_and_store_); off: FlashInfer's rotary, then an indexed
# copy of K and V (bench.profile_decode --compare-rope-store measures one against the other).
ROPE_AND_STORE = True
_rope_store = None


def _rope_store_kernel():
    global _rope_store
    if _rope_store is None:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(qkv, qkv_stride, q_out, q_stride, pos, cos_sin, cache, s_block, s_kv, s_tok, s_head, slot_blocks,
                   slot_offsets, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                   BLOCK: tl.constexpr):
            t = tl.program_id(0)
            h = tl.program_id(1)  # a query head, or (h >= HEADS) a KV head
            i = tl.arange(0, BLOCK)
            m = i < HALF
            p = tl.load(pos + t)
            cos = tl.load(cos_sin + p * D + i, mask=m)
            sin = tl.load(cos_sin + p * D + HALF + i, mask=m)
            row = qkv + t * qkv_stride + h * D
            x1 = tl.load(row + i, mask=m).to(tl.float32)
            x2 = tl.load(row + HALF + i, mask=m).to(tl.float32)
            y1 = (x1 * cos - x2 * sin).to(qkv.dtype.element_ty)
            y2 = (x2 * cos + x1 * sin).to(qkv.dtype.element_ty)
            if h < HEADS:
                q = q_out + t * q_stride + h * D
                tl.store(q + i, y1, mask=m)
                tl.store(q + HALF + i, y2, mask=m)
            else:
                dst = (cache + tl.load(slot_blocks + t) * s_block + tl.load(slot_offsets + t) * s_tok
                       + (h - HEADS) * s_head)
                tl.store(dst + i, y1, mask=m)
                tl.store(dst + HALF + i, y2, mask=m)
                v = row + KV_HEADS * D  # this KV head's v, KV_HEADS heads after its k
                tl.store(dst + s_kv + i, tl.load(v + i, mask=m), mask=m)
                tl.store(dst + s_kv + HALF + i, tl.load(v + HALF + i, mask=m), mask=m)

        _rope_store = (kernel, triton.next_power_of_2)
    return _rope_store


def rotate_and_store_(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, cache: torch.Tensor,
                      slot_blocks: torch.Tensor, slot_offsets: torch.Tensor, heads: int, kv_heads: int,
                      head_dim: int, q_out: torch.Tensor | None = None) -> None:
    """One kernel: rotate the query heads of qkv [T, (heads + 2 kv_heads) * head_dim] (in place, or into q_out
    [T, heads, head_dim] when given: the contiguous query attention reads, with no copy), and write each
    token's rotated k and its v into one layer's cache view [blocks, 2, block_size, kv_heads, head_dim] at
    (slot_blocks[t], slot_offsets[t]). Same math as rotate_ (float32, NeoX halves, rounded once)."""
    kernel, pow2 = _rope_store_kernel()
    if qkv.stride(1) != 1 or cache.stride(4) != 1 or cos_sin.stride(0) != head_dim:
        raise ValueError("rotate_and_store_ needs rows of contiguous heads")
    if q_out is not None and (q_out.stride(2) != 1 or q_out.stride(1) != head_dim):
        raise ValueError("rotate_and_store_'s q_out needs contiguous heads")
    q, q_stride = (qkv, qkv.stride(0)) if q_out is None else (q_out, q_out.stride(0))
    half = head_dim // 2
    kernel[(qkv.shape[0], heads + kv_heads)](
        qkv, qkv.stride(0), q, q_stride, positions, cos_sin, cache, cache.stride(0), cache.stride(1), cache.stride(2),
        cache.stride(3), slot_blocks, slot_offsets, HEADS=heads, KV_HEADS=kv_heads, D=head_dim, HALF=half,
        BLOCK=pow2(half))


class _Builds:
    def __init__(self) -> None:
        fi = flashinfer()
        self.builders = (fi.norm.get_norm_module, lambda: fi.activation.get_act_and_mul_module("silu"),
                         fi.rope.get_rope_module)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._build, name="flashinfer-jit", daemon=True)
        self.thread.start()

    def _build(self) -> None:
        try:
            with ThreadPoolExecutor(len(self.builders)) as pool:
                for f in [pool.submit(b) for b in self.builders]:
                    f.result()
        except Exception as e:  # noqa: BLE001 - reported by wait()
            self.error = e

    def wait(self) -> BaseException | None:
        """Block until built; the error that stopped a build, if any."""
        self.thread.join()
        return self.error


_builds: _Builds | None = None


def warm_up() -> _Builds:
    """Build (or load from FlashInfer's cache) the three kernel modules, concurrently, in the background."""
    global _builds
    if _builds is None:
        _builds = _Builds()
    return _builds
