"""Copies between CPU pools large enough to be split over threads (kv_transfer.descriptors: numpy on a few
threads) land bit-exactly: scattered and contiguous runs, whole blocks and head slices."""

import random

import torch

from kv_transfer import descriptors
from kv_transfer.descriptors import HeadSlice, copy_runs


def _pools(blocks: int = 130, heads: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randn(blocks + 1, 2, 2, 16, heads, 128).to(torch.bfloat16)  # 64 KiB a block, one scratch block
    return src, torch.zeros_like(src)


def test_a_large_scattered_copy_over_threads_is_bit_exact():
    src, dst = _pools()
    rng = random.Random(0)
    src_ids = rng.sample(range(130), 100)
    dst_ids = list(range(10, 40)) + rng.sample(range(40, 130), 70)  # one contiguous run, then scattered blocks
    assert len(src_ids) * src[0].numel() * 2 > (4 << 20)  # above the size copied on the calling thread
    copy_runs(src, dst, src_ids, dst_ids)
    assert torch.equal(dst[dst_ids], src[src_ids])
    untouched = sorted(set(range(131)) - set(dst_ids))
    assert torch.count_nonzero(dst[untouched]) == 0
    assert descriptors._host_copier is not None or descriptors.HOST_COPY_THREADS == 1


def test_a_large_head_slice_copy_over_threads_lands_in_its_heads():
    src, dst = _pools()
    ids = list(range(100))
    copy_runs(src, dst, ids, [i + 20 for i in ids], HeadSlice(1, 2, 2))  # source heads 1-2 into heads 2-3
    assert torch.equal(dst[20:120, ..., 2:4, :], src[:100, ..., 1:3, :])
    assert torch.count_nonzero(dst[20:120, ..., :2, :]) == 0
