"""Building blocks of Llama-family decoders: RMSNorm, the SwiGLU MLP and rotary embeddings, computed as
transformers does; with `use_fused` set (GPU, FlashInfer attention), through engine/fused.py's one-kernel ops."""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine import fused
from engine.parallel import Parallel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_fused = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rmsnorm(x); with a residual, (rmsnorm(residual + x), residual + x): the decoder's add and norm."""
        if residual is not None:
            if self.use_fused:  # one kernel, in place
                fused.add_rmsnorm(x, residual, self.weight, self.eps)
                return x, residual
            residual = residual + x
            x = residual
        elif self.use_fused:
            return fused.rmsnorm(x, self.weight, self.eps)
        # torch's rms_norm normalises in float32 and rounds once to x's dtype, as transformers does in four
        # ops; then the weight in x's dtype.
        out = F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight
        return out if residual is None else (out, residual)


class MLP(nn.Module):
    """SwiGLU with gate and up fused in one matmul; its intermediate dimension split over the tp ranks (the
    output is a partial sum the caller all-reduces). A dense layer's MLP, and Qwen2-MoE's shared expert."""

    def __init__(self, hidden: int, intermediate: int, par: Parallel):
        super().__init__()
        self.intermediate_size = par.split(intermediate, "intermediate_size")[1]
        self.gate_up_proj = nn.Linear(hidden, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, hidden, bias=False)
        self.use_fused = False
        self.lora: Any = None  # engine/lora.py's LayerLora, when the engine serves adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.lora is not None:
            gate_up = self.lora.add_first(x, gate_up)
        if self.use_fused:
            h = fused.silu_and_mul(gate_up)
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            h = F.silu(gate) * up
        y = self.down_proj(h)
        return y if self.lora is None else self.lora.add_second(h, y)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed in float32 as transformers does, looked up per token.

    x * cos + rotate_half(x) * sin, with rotate_half(x) * sin computed as roll(x) * (sin with its first half
    negated): the same values (a sign flip is exact) in three kernels instead of five, and the tables are
    kept in the activations' dtype so a step casts nothing.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sign = torch.cat((-torch.ones(head_dim // 2), torch.ones(head_dim // 2)))
        # [max_positions, 2, head_dim]: cos, and sin signed for the rolled input
        self.register_buffer("table", torch.stack((emb.cos(), emb.sin() * sign), dim=1), persistent=False)
        self._cast: dict[torch.dtype, torch.Tensor] = {}
        self._cos_sin: torch.Tensor | None = None

    def cos_sin(self) -> torch.Tensor:
        """float32 [max_positions, head_dim]: cos | sin of the half-dimension frequencies (fused.rotate_'s table)."""
        if self._cos_sin is None or self._cos_sin.device != self.table.device:
            half = self.table.shape[-1] // 2
            self._cos_sin = torch.cat((self.table[:, 0, :half], -self.table[:, 1, :half]), dim=-1).contiguous()
        return self._cos_sin

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[T, 2, 1, head_dim]: each token's cos and signed sin, broadcast over heads."""
        table = self._cast.get(dtype)
        if table is None or table.device != self.table.device:
            table = self._cast[dtype] = self.table.to(dtype)
        return table[positions].unsqueeze(2)

    def rotate(self, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim] rotated by each token's position (cos_sin from lookup)."""
        return x * cos_sin[:, 0] + x.roll(x.shape[-1] // 2, dims=-1) * cos_sin[:, 1]

