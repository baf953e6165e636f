"""engine.gemv's one-token GEMV with its fused prologues (residual add + RMSNorm, RMSNorm, SiLU-and-mul, none)
against the unfused ops they replace (engine.layers' PyTorch RMSNorm and SwiGLU, then F.linear): on the GPU,
and on the CPU through Triton's interpreter (so CI runs the kernel's logic too)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import fp8, gemv
from engine.layers import RMSNorm
from tests.helpers import run_in_triton_interpreter


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:  # the unfused SiLU-and-mul, as engine.layers.MLP
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def check(device: str) -> None:
    torch.manual_seed(2)
    close = dict(rtol=2e-2, atol=2e-2)
    bf16 = torch.bfloat16
    # (out, in, tile): even shapes, then ragged ones (masked edges)
    for n, k, tile in ((96, 256, gemv.Tile(8, 128, 4)), (37, 200, gemv.Tile(4, 64, 2))):
        norm = RMSNorm(k, 1e-5).to(device, bf16)
        norm.weight.data = torch.rand(k, dtype=bf16, device=device) + 0.5
        lin = nn.Linear(k, n, bias=True).to(device, bf16)
        x = torch.randn(1, k, dtype=bf16, device=device)
        residual = torch.randn(1, k, dtype=bf16, device=device) * 3

        # Unfused first (a tile for two tokens only), then the kernel: the same values within bf16 rounding.
        lin.gemv_tiles = {2: tile}
        want, want_res = gemv.norm_linear(x, residual, norm, lin)
        assert torch.equal(want_res, x + residual)
        lin.gemv_tiles = {1: tile}
        got, got_res = gemv.norm_linear(x, residual, norm, lin)
        torch.testing.assert_close(got, want, **close)
        # The new residual stream: the rounded sum, bit for bit on the GPU (the interpreter's float -> bf16
        # cast truncates where CUDA rounds to nearest, so there within one bf16 step).
        if device == "cuda":
            assert torch.equal(got_res, want_res)
        torch.testing.assert_close(got_res, want_res, rtol=8e-3, atol=0)
        assert got_res.data_ptr() != residual.data_ptr()  # written out of place (other programs read it)

        got, same = gemv.norm_linear(x, None, norm, lin)  # the first layer: norm only, x is the residual
        assert same is x
        torch.testing.assert_close(got, lin(norm(x)), **close)

        want = F.linear(x.float(), lin.weight.float(), lin.bias.float()).to(bf16)
        torch.testing.assert_close(gemv.linear(x, lin), want, **close)

        down = nn.Linear(k, n, bias=False).to(device, bf16)
        gate_up = torch.randn(1, 2 * k, dtype=bf16, device=device) * 2
        want = gemv.act_linear(gate_up, down, swiglu)
        down.gemv_tiles = {1: tile}
        torch.testing.assert_close(gemv.act_linear(gate_up, down, swiglu), want, **close)

        # FP8 weights (engine/fp8.Fp8Linear): read as e4m3, each row's sum times its scale; the input as it is.
        q = fp8.Fp8Linear(lin)
        q.gemv_tiles = {1: tile}
        dequantized = q.weight.float() * q.weight_scale.view(-1, 1)
        want = F.linear(x.float(), dequantized, lin.bias.float()).to(bf16)
        torch.testing.assert_close(gemv.linear(x, q), want, **close)
        qd = fp8.Fp8Linear(down)
        qd.gemv_tiles = {1: tile}
        want = F.linear(swiglu(gate_up.float()).to(bf16).float(), qd.weight.float() * qd.weight_scale.view(-1, 1))
        torch.testing.assert_close(gemv.act_linear(gate_up, qd, swiglu), want.to(bf16), **close)

        # Two tokens (no tile for that size): the unfused path, bit for bit.
        other = torch.randn(2, k, dtype=bf16, device=device)
        assert torch.equal(gemv.linear(other, lin), lin(other))
    with pytest.raises(ValueError, match="columns"):
        gemv.gemv(lin.weight, torch.zeros(1, k + 1, dtype=bf16, device=device), tile)


@pytest.mark.gpu
def test_one_token_gemv_with_fused_norm_and_activation_matches_the_unfused_ops_on_gpu():
    check("cuda")


def test_one_token_gemv_with_fused_norm_and_activation_matches_the_unfused_ops_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.engine.test_gemv_kernel import check\ncheck('cpu')")
