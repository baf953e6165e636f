"""engine.fused.silu_and_mul_wide (Triton, spread over column blocks) against PyTorch's silu(gate) * up in
float32: on the GPU, and on the CPU through Triton's interpreter (so CI runs the kernel's logic too)."""

import pytest
import torch

from engine import fused
from tests.helpers import run_in_triton_interpreter


def check(device: str) -> None:
    torch.manual_seed(2)
    for tokens, n, block in ((1, 3000, 1024), (5, 96, 64), (0, 64, 64)):  # 3000, 96: a ragged last block
        gate_up = (torch.randn(tokens, 2 * n) * 3).to(torch.bfloat16).to(device)
        want = (torch.nn.functional.silu(gate_up[:, :n].float()) * gate_up[:, n:].float()).to(torch.bfloat16)
        got = fused.silu_and_mul_wide(gate_up, block=block)
        assert got.shape == (tokens, n)
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)


@pytest.mark.gpu
def test_wide_silu_and_mul_matches_pytorch_on_gpu():
    check("cuda")


def test_wide_silu_and_mul_matches_pytorch_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.engine.test_silu_and_mul_kernel import check\ncheck('cpu')")
