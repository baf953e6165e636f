"""FlashInfer's fused kernels for the small ops of a GPU forward: residual add + RMSNorm, SiLU-and-mul, rotary.

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


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2n] (gate | up) -> silu(gate) * up [T, n]."""
    return flashinfer().activation.silu_and_mul(gate_up)


def rotate_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_dim: int,
            cos_sin: torch.Tensor) -> None:
    """Rotate q [T, heads(*head_dim)] and k in place (strided views into the qkv projection are fine);
    cos_sin: float32 [max_positions, head_dim], cos of the half-dimension frequencies | their sin."""
    flashinfer().rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, head_dim, cos_sin, is_neox=True)


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
