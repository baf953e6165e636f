"""Batch-1 decode linears as Triton GEMVs with the small op before them fused in (GPU, CUDA-graph decode).

At batch 1 a decode step of an 8B model is a chain of matrix-vector products (each reads its weight once) with
small kernels between them: residual add + RMSNorm before qkv_proj and gate_up_proj, SiLU-and-mul before
down_proj. Each small kernel costs a launch and a ramp of the next matmul (~3-5 us on an H200, ~0.35 ms a
step for Llama-3-8B). Here each such op becomes the prologue of the GEMV that follows it: every program
recomputes it on the slice of the input it multiplies (a few KB a token, read from L2), so one kernel
replaces two. `linear` (o_proj) is the plain product (no split-K reduce kernel as cuBLAS picks for it).

One token only: with T tokens every program would recompute the prologue on T rows, T/BLOCK_N times the
weight's bytes in input reads; a tl.dot version of this kernel measured 0.14-0.95x the unfused path at batch
2-64 on an H200, so larger batches keep FlashInfer's kernels and cuBLAS.

Each role (qkv, o, gate_up, down) is timed at graph capture against the path it replaces (FlashInfer's norm
or activation, then cuBLAS), over every layer's weights in turn (as a step reads them, not from L2) in a CUDA
graph, for ten tile shapes; a role takes the Triton kernel only where it won (`tune`). Without tuning, every
call takes the unfused path. Numerics: float32 inside, the output rounded once. SiLU-and-mul's output is
rounded to the activations' dtype before the product, as FlashInfer's kernel rounds it; RMSNorm's is not: its
1/rms, one number a token, scales the finished sums (sum_k W[n,k] x[k] w[k] / rms), so the kernel reads x
once, in the same pass that sums its squares (rounding apart, the same value; the new residual stream is
rounded as FlashInfer's). FP8 weights (engine/fp8.py) are read as they are, half the bytes, and their scale a
row multiplies the sums: the input is not quantized here (unlike the FP8 GEMM of larger batches).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("pdserve.engine")

# Captured batch sizes up to this many tokens are tuned (the kernel is for one token); ENABLED off: tune()
# chooses nothing (bench.profile_decode --compare-gemv measures both ways).
MAX_TOKENS = 1
ENABLED = True
FORCE: dict[int, Tile] | None = None  # tests: {batch size: tile} for every role, untimed (other sizes unfused)
PLAIN, NORM, ADD_NORM, SILU_MUL = 0, 1, 2, 3  # prologues

_kernel = None


@dataclass(frozen=True)
class Tile:
    block_n: int  # output columns (weight rows) a program
    block_k: int  # input columns an iteration
    warps: int


# The last two read 2048 columns an iteration: as many bytes as 1024 of bf16, for FP8 weights (engine/fp8.py).
TILES = [Tile(n, k, w) for n, k, w in ((2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 512, 4),
                                      (8, 512, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8), (32, 128, 4),
                                      (4, 2048, 4), (8, 2048, 8))]


def _build():
    global _kernel
    if _kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(w, w_stride, x, res, res_out, norm_w, bias, w_scale, out, N, K, eps, NORMED: tl.constexpr,
                   ADD: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr,
                   EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
            pid = tl.program_id(0)
            rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            cols = tl.arange(0, BLOCK_K)
            rmask = rows < N
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            ss = tl.zeros([BLOCK_K], dtype=tl.float32)  # the input's squares, for the norm
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + cols
                km = ks < K
                if SILU:  # x is [gate | up], 2K wide
                    g = tl.load(x + ks, mask=km, other=0.0).to(tl.float32)
                    u = tl.load(x + K + ks, mask=km, other=0.0).to(tl.float32)
                    v = (g / (1.0 + tl.exp(-g)) * u).to(out.dtype.element_ty).to(tl.float32)
                else:
                    v = tl.load(x + ks, mask=km, other=0.0).to(tl.float32)
                    if ADD:
                        v += tl.load(res + ks, mask=km, other=0.0).to(tl.float32)
                        if pid == 0:  # one program writes the new residual stream (rounded, as FlashInfer's)
                            tl.store(res_out + ks, v.to(res_out.dtype.element_ty), mask=km)
                    if NORMED:
                        ss += v * v
                        v = v * tl.load(norm_w + ks, mask=km, other=0.0).to(tl.float32)
                ptrs = w + rows[:, None] * w_stride + ks[None, :]
                if EVEN:
                    wt = tl.load(ptrs, eviction_policy="evict_first")
                else:
                    wt = tl.load(ptrs, mask=rmask[:, None] & km[None, :], other=0.0, eviction_policy="evict_first")
                acc += wt.to(tl.float32) * v[None, :]
            y = tl.sum(acc, axis=1)
            if NORMED:  # rmsnorm's 1/rms is one number a token: applied to the sums, so one pass over x does
                y = y / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
            if SCALED:  # FP8 weights (engine/fp8.py): a float32 scale a row
                y = y * tl.load(w_scale + rows, mask=rmask, other=0.0)
            if HAS_BIAS:
                y += tl.load(bias + rows, mask=rmask, other=0.0).to(tl.float32)
            tl.store(out + rows, y.to(out.dtype.element_ty), mask=rmask)

        _kernel = (kernel, triton.cdiv)
    return _kernel


def gemv(weight: torch.Tensor, x: torch.Tensor, tile: Tile, prologue: int = PLAIN, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         weight_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """weight [N, K] (rows contiguous) times one token's input x [1, K] ([1, 2K] gate | up for SILU_MUL) after
    the prologue: (out [1, N], the new residual stream [1, K] for ADD_NORM else None). weight_scale: FP8
    weights' float32 scale a row (N values), applied to the sums (the input stays in its dtype)."""
    kernel, cdiv = _build()
    n, k = weight.shape
    if weight.stride(1) != 1 or not x.is_contiguous() or x.shape[0] != 1:
        raise ValueError("gemv takes one contiguous token and a weight with contiguous rows")
    if x.shape[1] != (2 * k if prologue == SILU_MUL else k):
        raise ValueError(f"gemv: input of {x.shape[1]} columns for a weight of {k}")
    out = x.new_empty(1, n)
    res_out = torch.empty_like(residual) if prologue == ADD_NORM else None
    kernel[(cdiv(n, tile.block_n),)](
        weight, weight.stride(0), x, residual if residual is not None else x, res_out if res_out is not None else x,
        norm_weight if norm_weight is not None else x, bias if bias is not None else x,
        weight_scale if weight_scale is not None else x, out, n, k, eps,
        NORMED=prologue in (NORM, ADD_NORM), ADD=prologue == ADD_NORM, SILU=prologue == SILU_MUL,
        HAS_BIAS=bias is not None, SCALED=weight_scale is not None, EVEN=n % tile.block_n == 0 and k % tile.block_k == 0, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, num_warps=tile.warps)
    return out, res_out


def _tile(linear: nn.Linear, x: torch.Tensor) -> Tile | None:
    """The tile tuned for this many tokens (a captured batch size), or None: the unfused path."""
    tiles = getattr(linear, "gemv_tiles", None)
    return tiles.get(x.shape[0]) if tiles else None


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm, linear: nn.Linear
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """linear(norm(x + residual)) and the new residual stream (x itself when residual is None): the decoder's
    add + RMSNorm + projection. norm: an engine.layers.RMSNorm."""
    tile = _tile(linear, x)
    if tile is None:
        if residual is None:
            return linear(norm(x)), x
        h, residual = norm(x, residual)
        return linear(h), residual
    out, res_out = gemv(linear.weight, x, tile, NORM if residual is None else ADD_NORM, linear.bias, residual,
                        norm.weight, norm.eps, _scale(linear))
    return out, (x if res_out is None else res_out)


def act_linear(gate_up: torch.Tensor, linear: nn.Linear, act) -> torch.Tensor:
    """linear(silu(gate) * up) for gate_up [T, 2n]; act: the unfused SiLU-and-mul."""
    tile = _tile(linear, gate_up)
    if tile is None:
        return linear(act(gate_up))
    return gemv(linear.weight, gate_up, tile, SILU_MUL, linear.bias, weight_scale=_scale(linear))[0]


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    tile = _tile(layer, x)
    if tile is None:
        return layer(x)
    return gemv(layer.weight, x, tile, PLAIN, layer.bias, weight_scale=_scale(layer))[0]


def _scale(linear: nn.Module) -> torch.Tensor | None:
    """An FP8 linear's scales as one row (engine/fp8.Fp8Linear), None for a plain one."""
    scale = getattr(linear, "weight_scale", None)
    return None if scale is None else scale.view(-1)


def _time(fn) -> float:
    """GPU seconds of fn() (which runs every layer's op once) replayed as a CUDA graph, as a decode step runs
    it (timed eagerly, Python's launch overhead would be measured instead)."""
    from engine.cuda_graphs import replay_seconds

    fn()  # compiles, and raises here (outside the capture) for a tile that cannot run
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return replay_seconds(graph, reps=5)


ROLES = ("qkv", "o", "gate_up", "down")


def _linears(layer) -> dict[str, nn.Module]:
    return {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj, "gate_up": layer.mlp.gate_up_proj,
            "down": layer.mlp.down_proj}


def tune(model, sizes: list[int]) -> dict[int, dict[str, dict]]:
    """For each batch size of `sizes` up to MAX_TOKENS, time each role's Triton tiles against its unfused path
    over all of the model's dense decoder layers, and note the winning tile (if a tile wins) in that role's
    linears' `gemv_tiles` {batch size: tile}. Returns {batch size: {role: report}}."""
    from engine.layers import MLP

    layers = [m for m in model.layers if isinstance(m.mlp, MLP)]
    for layer in layers:
        for lin in _linears(layer).values():
            lin.gemv_tiles = {}
    if not layers or not ENABLED or not layers[0].gemv_path:
        return {}
    report = {}
    with torch.inference_mode():
        for bs in sizes:
            if bs <= MAX_TOKENS and (FORCE is None or bs in FORCE):
                report[bs] = _tune_size(layers, bs)
    chosen = {bs: {r: v["tile"] for r, v in roles.items() if v["chosen"]} for bs, roles in report.items()}
    log.info("Triton decode linears chosen (batch size: role -> tile): %s", chosen)
    return report


def _tune_size(layers, bs: int) -> dict[str, dict]:
    from engine import fused

    p = layers[0].input_layernorm.weight  # the activations' dtype (an FP8 linear's weight is e4m3)
    dev, dt = p.device, p.dtype

    def rand(cols: int) -> torch.Tensor:
        return torch.randn(bs, cols, device=dev, dtype=dt)

    hidden, inter = layers[0].input_layernorm.weight.shape[0], layers[0].mlp.intermediate_size
    x, res, gate_up, attn_out = rand(hidden), rand(hidden), rand(2 * inter), rand(layers[0].self_attn.q_size)

    def add_norm(role: str, norm_name: str):
        xb, rb = x.clone(), res.clone()  # the unfused path's in-place buffers (their values do not matter)

        def base():
            for layer in layers:
                getattr(layer, norm_name)(xb, rb)
                _linears(layer)[role](xb)

        def triton_(tile):
            def run():
                for layer in layers:
                    lin, norm = _linears(layer)[role], getattr(layer, norm_name)
                    gemv(lin.weight, x, tile, ADD_NORM, lin.bias, res, norm.weight, norm.eps, _scale(lin))
            return run
        return base, triton_

    def plain(role: str, inp: torch.Tensor, prologue: int, unfused):
        def base():
            for layer in layers:
                _linears(layer)[role](unfused(inp))

        def triton_(tile):
            def run():
                for layer in layers:
                    lin = _linears(layer)[role]
                    gemv(lin.weight, inp, tile, prologue, lin.bias, weight_scale=_scale(lin))
            return run
        return base, triton_

    roles = {"qkv": add_norm("qkv", "input_layernorm"), "o": plain("o", attn_out, PLAIN, lambda t: t),
             "gate_up": add_norm("gate_up", "post_attention_layernorm"),
             "down": plain("down", gate_up, SILU_MUL, fused.silu_and_mul)}
    report = {}
    for role, (base, triton_) in roles.items():
        if FORCE is not None:
            chosen, report[role] = FORCE[bs], dict(tile=vars(FORCE[bs]), chosen=True, forced=True)
        else:
            base_s = _time(base)
            timings = {}
            for tile in TILES:
                try:
                    timings[tile] = _time(triton_(tile))
                except Exception as e:  # noqa: BLE001 - a tile that does not compile or fit here is left out
                    log.debug("Triton tile %s for %s at batch %d: %s", tile, role, bs, e)
            best = min(timings, key=timings.get, default=None)
            chosen = best if best is not None and timings[best] < base_s else None
            report[role] = dict(unfused_us=base_s * 1e6 / len(layers),
                                best_us=timings[best] * 1e6 / len(layers) if best else None,
                                tile=None if best is None else vars(best), chosen=chosen is not None)
        if chosen is not None:
            for layer in layers:
                _linears(layer)[role].gemv_tiles[bs] = chosen
    return report
