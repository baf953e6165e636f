"""engine.fused.rotate_and_store_ (rotary + the KV-cache write in one Triton kernel) against the PyTorch rotary
followed by an indexed K/V copy, into a strided layer view of a block-major pool at scattered slots: on the
GPU, and on the CPU through Triton's interpreter (so CI runs the kernel's logic too)."""

import pytest
import torch

from engine import fused
from engine.layers import RotaryEmbedding
from tests.helpers import run_in_triton_interpreter


def check(device: str, head_dim: int) -> None:
    torch.manual_seed(1)
    bf16, d = torch.bfloat16, head_dim
    close = dict(rtol=2e-2, atol=2e-2)
    heads, kv_heads, rows, layers, blocks, bs = 8, 2, 37, 3, 20, 16
    rotary = RotaryEmbedding(d, 4096, 500000.0, None).to(device)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, dtype=bf16).to(device)
    positions = torch.randint(0, 4096, (rows,)).to(device)
    slots = torch.randperm(blocks * bs)[:rows].to(device)
    slot_blocks, slot_offsets = slots // bs, slots % bs
    pool = torch.zeros(blocks, layers, 2, bs, kv_heads, d, dtype=bf16, device=device)
    want_pool = pool.clone()
    qk = rotary.rotate(qkv[:, : (heads + kv_heads) * d].view(rows, -1, d), rotary.lookup(positions, bf16))
    want_pool[slot_blocks, 1, 0, slot_offsets] = qk[:, heads:]
    want_pool[slot_blocks, 1, 1, slot_offsets] = qkv[:, (heads + kv_heads) * d :].view(rows, kv_heads, d)
    got = qkv.clone()
    fused.rotate_and_store_(got, positions, rotary.cos_sin(), pool[:, 1], slot_blocks, slot_offsets, heads,
                            kv_heads, d)
    torch.testing.assert_close(got[:, : heads * d].view(rows, heads, d), qk[:, :heads], **close)  # q in place
    torch.testing.assert_close(pool, want_pool, **close)  # k rotated, only layer 1's slots written
    assert torch.equal(pool[:, 1, 1], want_pool[:, 1, 1])  # v copied bit for bit
    assert torch.equal(got[:, heads * d :], qkv[:, heads * d :])  # k and v in qkv untouched
    assert torch.count_nonzero(pool[:, [0, 2]]) == 0
    # The query written out of place (contiguous, as attention reads it): qkv left as it was.
    q_out, again = torch.zeros(rows, heads, d, dtype=bf16, device=device), torch.zeros_like(pool)
    unrotated = qkv.clone()
    fused.rotate_and_store_(unrotated, positions, rotary.cos_sin(), again[:, 1], slot_blocks, slot_offsets, heads,
                            kv_heads, d, q_out)
    assert torch.equal(q_out, got[:, : heads * d].view(rows, heads, d))
    assert torch.equal(unrotated, qkv) and torch.equal(again, pool)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [128, 80])
def test_rotary_fused_with_the_kv_write_matches_rotary_then_write_on_gpu(head_dim):
    check("cuda", head_dim)  # 80: not a power of two, checks the masking


def test_rotary_fused_with_the_kv_write_matches_rotary_then_write_in_the_triton_interpreter():
    run_in_triton_interpreter("from tests.engine.test_rope_and_kv_store_kernel import check\n"
                              "for d in (128, 80): check('cpu', d)")
