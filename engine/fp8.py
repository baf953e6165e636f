"""FP8 weights: FP8 checkpoints read as they are published, and linears that compute in FP8 (e4m3).

Two checkpoint layouts are read (their `quantization_config` in config.json says which; ModelConfig reads it):
- `quant_method: fp8` (Qwen's and DeepSeek's FP8 releases, transformers' FineGrainedFP8): `*.weight` in e4m3 with
  `*.weight_scale_inv`, one float32 scale a block of `weight_block_size` ([128, 128]) or one a tensor;
- `quant_method: compressed-tensors`, format `float-quantized` (llm-compressor's FP8): `*.weight` in e4m3 with
  `*.weight_scale`, one a row (strategy `channel`) or one a tensor.
Each FP8 tensor is read dequantized (e4m3 value x its scale, in float32) into the model's parameters, so on a
CPU the engine computes exactly what transformers computes with the dequantized weights.

`quantize_linears` (EngineConfig.quantization = "fp8", the default for an FP8 checkpoint on a GPU) then turns
the decoder's linears into `Fp8Linear`: e4m3 weights with a float32 scale a row (absmax / 448), and each token's
input quantized the same way when it runs (dynamic, per token), the product through `torch._scaled_mm`
(cuBLASLt's FP8 GEMM on Hopper; half the weight bytes a decode step reads). The embedding, the output head and
the norms stay in the model dtype; so do MoE experts (their grouped GEMM has no FP8 path here yet).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from engine.errors import ModelLoadError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")


class _Dequantized:
    """A lazy FP8 weight read as float32: slicing reads the e4m3 slice and multiplies by its scale."""

    def __init__(self, name: str, weight: Any, scale: torch.Tensor, block: tuple[int, ...]):
        self.name, self.weight = name, weight
        self.shape = tuple(weight.get_shape() if hasattr(weight, "get_shape") else weight.shape)
        self.scale = _expand_scale(name, scale.float(), self.shape, block)

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def __getitem__(self, index) -> torch.Tensor:
        w = self.weight[index]
        if w.dtype != FP8:
            raise ModelLoadError(f"{self.name} has a scale but dtype {w.dtype}, not float8_e4m3fn")
        return w.float() * self.scale[index]


def _expand_scale(name: str, scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, ...]) -> torch.Tensor:
    """The scale broadcast to the weight's shape: one a tensor, one a row ([rows, 1] or [rows]), or one a block
    of (bn, bk) = block ([ceil(rows / bn), ceil(cols / bk)], the last ones ragged)."""
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(shape)
    rows, cols = shape
    if block:
        bn, bk = block
        if tuple(scale.shape) == (-(-rows // bn), -(-cols // bk)):
            return scale.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
    elif scale.shape in ((rows, 1), (rows,)):
        return scale.reshape(rows, 1).expand(shape)
    raise ModelLoadError(f"{name}: a scale of shape {tuple(scale.shape)} does not fit a weight of shape {shape}")


def dequantized(weights: Iterable[tuple[str, Any]], block: tuple[int, ...] = ()) -> Iterator[tuple[str, Any]]:
    """The checkpoint's tensors with each FP8 weight paired with its scale and read dequantized; scales and
    static activation scales are consumed. A weight waits (unread) for a scale stored after it. block: the
    checkpoint's weight_block_size, () for scales a row or a tensor."""
    pending: dict[str, Any] = {}  # weight name -> its lazy tensor, until its scale comes
    scales: dict[str, torch.Tensor] = {}  # weight name -> its scale, until the weight comes
    for name, source in weights:
        if name.endswith(".input_scale"):
            continue  # static activation scales: inputs are quantized per token when they run
        suffix = next((s for s in _SCALE_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            weight_name = name[: -len(suffix)] + ".weight"
            scale = source[:] if not isinstance(source, torch.Tensor) else source
            if weight_name in pending:
                yield weight_name, _Dequantized(weight_name, pending.pop(weight_name), scale, block)
            else:
                scales[weight_name] = scale
        elif name in scales:
            yield name, _Dequantized(name, source, scales.pop(name), block)
        elif name.endswith(".weight") and _is_fp8(source):
            pending[name] = source
        else:
            yield name, source
    if pending:
        raise ModelLoadError(f"FP8 weights without a scale: {sorted(pending)[:5]}")
    if scales:
        raise ModelLoadError(f"scales without their weight: {sorted(scales)[:5]}")


def _is_fp8(source: Any) -> bool:
    dtype = source.dtype if isinstance(source, torch.Tensor) else source.get_dtype()
    return str(dtype).removeprefix("torch.") in ("float8_e4m3fn", "F8_E4M3")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scales [rows, 1]): each row scaled so that its largest magnitude is 448."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


_kernel = None


def _build():
    global _kernel
    if _kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(x, x_stride, out, scale, K, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            cols = tl.arange(0, BLOCK)
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                v = tl.load(x + row * x_stride + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            s = tl.maximum(tl.max(amax, axis=0) / FP8_MAX, 1e-12)
            tl.store(scale + row, s)
            for k0 in range(0, K, BLOCK):  # the row again (from L2): divided, clamped, rounded to e4m3
                m = k0 + cols < K
                v = tl.load(x + row * x_stride + k0 + cols, mask=m, other=0.0).to(tl.float32)
                q = tl.minimum(tl.maximum(v / s, -FP8_MAX), FP8_MAX)
                tl.store(out + row * K + k0 + cols, q.to(out.dtype.element_ty), mask=m)

        _kernel = (kernel, triton.next_power_of_2)
    return _kernel


def quantize_rows_fused(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows in one Triton kernel (a program a row) instead of five PyTorch ops: the values are the
    same (float32 absmax / 448, then x / scale rounded to e4m3)."""
    kernel, pow2 = _build()
    rows, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, k, dtype=FP8, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = min(4096, pow2(k))
    kernel[(rows,)](x, x.stride(0), out, scale, k, FP8_MAX=FP8_MAX, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out, scale


class Fp8Linear(nn.Module):
    """y = x W^T (+ b) with W in e4m3 (a float32 scale a row) and x quantized per token when it runs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.data)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.reshape(1, -1).contiguous(), requires_grad=False)  # [1, out]
        self.bias = linear.bias
        self.quantize_input = quantize_rows_fused if weight.is_cuda else quantize_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x8, x_scale = self.quantize_input(x.reshape(-1, shape[-1]))
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype  # cuBLASLt's row-scaled FP8 GEMM writes bf16
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def check_device(device: torch.device) -> None:
    """FP8 GEMMs need a GPU of compute capability 8.9 (Ada) or 9.0 (Hopper) and up; a CPU runs them too."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ModelLoadError(f"FP8 weights need a GPU with FP8 tensor cores (Ada or Hopper and later); {name} has "
                             "none: serve the bf16 checkpoint, or leave --quantization unset for an FP8 one on a CPU")


def quantize_linears(model: nn.Module) -> int:
    """Every projection of the decoder layers (attention and dense MLPs, Qwen2-MoE's shared expert; not the MoE
    routers) becomes an Fp8Linear, in place, one at a time (the bf16 weight freed as its FP8 copy is made). Returns how many."""
    count = 0
    for layer in model.layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child_name.endswith("_proj"):  # not an MoE router or gate
                    setattr(parent, child_name, Fp8Linear(child))
                    count += 1
    return count
