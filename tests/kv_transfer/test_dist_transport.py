"""The torch.distributed transport (NCCL's code path, run here with gloo) moves blocks bit-exactly between
two processes, refuses a layout mismatch, and fails cleanly when the peer dies or times out."""

import multiprocessing as mp
import os
import signal

import pytest
import torch

from kv_transfer.descriptors import LayoutMismatchError, PoolDescriptor, TransferError
from kv_transfer.dist_transport import DistTransport

SHAPE = (65, 4, 2, 16, 2, 32)  # 64 blocks + scratch
SRC, DST = [3, 4, 5, 9, 30, 31, 2, 40], [10, 11, 12, 40, 41, 42, 0, 7]


def _desc(agent: str, **over) -> PoolDescriptor:
    fields = dict(agent=agent, transport="nccl", address="", num_blocks=64, num_layers=4, block_size=16,
                  num_kv_heads=2, head_dim=32, dtype="float32")
    return PoolDescriptor(**(fields | over))


def _receiver(q_out, q_in, fail: str | None) -> None:
    pool = torch.zeros(SHAPE)
    t = DistTransport("decode", backend="gloo", timeout_s=5)
    q_out.put(t.register_pool(pool, _desc("decode")).to_dict())
    t.accept("prefill")
    if fail == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if fail == "silent":
        q_in.get(timeout=60)
        return
    t.receive_blocks("prefill", DST)
    others = pool[[b for b in range(64) if b not in DST]]
    q_out.put(("bytes", _bytes(pool[DST]), _bytes(others).count(0) == others.numel() * 4))


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _start(fail: str | None = None):
    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(q_out, q_in, fail))
    proc.start()
    return proc, q_out, q_in


def test_blocks_move_bit_exactly_between_processes():
    proc, q_out, _ = _start()
    try:
        src = torch.randn(SHAPE)
        sender = DistTransport("prefill", backend="gloo", timeout_s=10)
        sender.register_pool(src, _desc("prefill"))
        sender.connect(PoolDescriptor.from_dict(q_out.get(timeout=60)))
        sender.write_blocks("decode", SRC, DST)
        tag, got, untouched = q_out.get(timeout=60)
        assert tag == "bytes" and got == _bytes(src[SRC]) and untouched
    finally:
        proc.join(30)


def test_layout_mismatch_is_refused_before_any_connection():
    sender = DistTransport("prefill", backend="gloo")
    sender.register_pool(torch.zeros(SHAPE), _desc("prefill"))
    with pytest.raises(LayoutMismatchError, match="num_kv_heads"):
        sender.connect(_desc("decode", num_kv_heads=4, address="gloo://127.0.0.1:1"))


@pytest.mark.parametrize("fail", ["die", "silent"])
def test_dead_or_silent_peer_gives_a_clean_error(fail):
    proc, q_out, q_in = _start(fail)
    try:
        sender = DistTransport("prefill", backend="gloo", timeout_s=5)
        sender.register_pool(torch.randn(SHAPE), _desc("prefill"))
        peer = PoolDescriptor.from_dict(q_out.get(timeout=60))
        with pytest.raises(TransferError):  # a peer that dies mid-handshake fails connect, later the write
            sender.connect(peer)
            sender.write_blocks("decode", SRC * 200, DST * 200, timeout_s=3)  # more than socket buffers hold
        assert "decode" not in sender.groups  # the broken pair is dropped; a new connect starts over
    finally:
        q_in.put("done")
        proc.join(30)
