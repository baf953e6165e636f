"""CUDA IPC transport: two processes on one GPU move scattered blocks bit-exactly."""

import multiprocessing as mp

import pytest
import torch

from kv_transfer.cuda_ipc_transport import CudaIpcTransport
from kv_transfer.descriptors import PoolDescriptor

pytestmark = pytest.mark.gpu
SHAPE = (129, 8, 2, 16, 4, 64)  # 128 blocks + scratch


def _desc(agent: str) -> PoolDescriptor:
    return PoolDescriptor(agent, "host", "", 128, 8, 16, 4, 64, "bfloat16")


def _receiver(descs, results, dst_ids) -> None:
    pool = torch.zeros(SHAPE, dtype=torch.bfloat16, device="cuda")
    t = CudaIpcTransport("decode")
    descs.put(t.register_pool(pool, _desc("decode")).to_dict())
    results.get(timeout=60)  # the sender wrote
    torch.cuda.synchronize()
    others = pool[[i for i in range(128) if i not in dst_ids]]
    results.put(("ok", _bytes(pool[dst_ids]), _bytes(others).count(0) == others.numel() * 2))


def _bytes(t: torch.Tensor) -> bytes:
    return t.cpu().contiguous().view(torch.uint8).numpy().tobytes()


def test_scattered_blocks_move_bit_exactly_between_processes():
    ctx = mp.get_context("spawn")
    descs, results = ctx.Queue(), ctx.Queue()
    src_ids, dst_ids = [5, 6, 7, 40, 90, 91], [100, 101, 102, 3, 50, 51]
    proc = ctx.Process(target=_receiver, args=(descs, results, dst_ids))
    proc.start()
    try:
        src = torch.randn(SHAPE, device="cuda").to(torch.bfloat16)
        sender = CudaIpcTransport("prefill")
        sender.register_pool(src, _desc("prefill"))
        sender.connect(PoolDescriptor.from_dict(descs.get(timeout=60)))
        sender.write_blocks("decode", src_ids, dst_ids)
        results.put("written")
        status, got, untouched = results.get(timeout=60)
        assert status == "ok" and got == _bytes(src[src_ids]) and untouched
    finally:
        proc.join(30)
