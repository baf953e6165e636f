"""The host transport moves blocks bit-exactly between processes and fails cleanly."""

import multiprocessing as mp
import os
import signal
import time
import uuid

import pytest
import torch

from kv_transfer.descriptors import LayoutMismatchError, PoolDescriptor, TransferError, block_runs
from kv_transfer.host_transport import SHM_DIR, HostTransport, shared_pool

LAYOUT = dict(num_layers=4, block_size=16, num_kv_heads=2, head_dim=32, dtype="float32")
NUM_BLOCKS = 64


def _desc(agent: str, path: str, **over) -> PoolDescriptor:
    fields = dict(agent=agent, transport="host", address=path, num_blocks=NUM_BLOCKS, **LAYOUT)
    fields.update(over)
    return PoolDescriptor(**fields)


def _shape() -> tuple[int, ...]:
    return (NUM_BLOCKS + 1, LAYOUT["num_layers"], 2, LAYOUT["block_size"], LAYOUT["num_kv_heads"], LAYOUT["head_dim"])


def _receiver(path: str, ready, done) -> None:
    pool = shared_pool(__import__("pathlib").Path(path), _shape(), torch.float32)
    assert pool.abs().sum() == 0
    ready.set()
    done.wait(30)


def _start_receiver():
    """A process that owns a zeroed pool in a shared-memory file; returns (path, process, done event)."""
    path = str(SHM_DIR / f"pdserve-test-{uuid.uuid4().hex}")
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_receiver, args=(path, ready, done))
    proc.start()
    assert ready.wait(30)
    return path, proc, done


def test_blocks_move_bit_exactly_between_processes():
    path, proc, done = _start_receiver()
    try:
        src_pool = torch.randn(_shape())
        sender = HostTransport("prefill-0")
        sender.register_pool(src_pool, _desc("prefill-0", "unused"))
        sender.connect(_desc("decode-0", path))
        src, dst = [3, 4, 5, 9, 30, 31, 2], [10, 11, 12, 40, 41, 42, 0]  # scattered, with contiguous runs
        sender.write_blocks("decode-0", src, dst)
        received = torch.from_file(path, shared=True, size=src_pool.numel(), dtype=torch.float32).view(_shape())
        assert torch.equal(received[dst], src_pool[src])
        untouched = [b for b in range(NUM_BLOCKS) if b not in dst]
        assert received[untouched].abs().sum() == 0
    finally:
        done.set()
        proc.join(10)
        os.unlink(path)


def test_layout_mismatch_is_refused_at_handshake(tmp_path):
    sender = HostTransport("p")
    sender.register_pool(torch.zeros(_shape()), _desc("p", "unused"))
    with pytest.raises(LayoutMismatchError, match="head_dim"):
        sender.connect(_desc("d", str(tmp_path / "x"), head_dim=64))
    with pytest.raises(LayoutMismatchError, match="dtype"):
        sender.connect(_desc("d", str(tmp_path / "x"), dtype="bfloat16"))
    with pytest.raises(LayoutMismatchError, match="dtype"):  # a peer with an FP8 pool (--kv-cache-dtype fp8)
        sender.connect(_desc("d", str(tmp_path / "x"), dtype="float8_e4m3fn"))


def test_dead_peer_and_bad_blocks_give_clean_errors(tmp_path):
    sender = HostTransport("p")
    sender.register_pool(torch.zeros(_shape()), _desc("p", "unused"))
    with pytest.raises(TransferError, match="does not exist"):
        sender.connect(_desc("gone", str(tmp_path / "missing")))
    with pytest.raises(TransferError, match="not connected"):
        sender.write_blocks("gone", [1], [1])
    path = tmp_path / "pool"
    shared_pool(path, _shape(), torch.float32)
    sender.connect(_desc("d", str(path)))
    with pytest.raises(TransferError, match="out of range"):
        sender.write_blocks("d", [1], [NUM_BLOCKS])


def test_killed_receiver_does_not_hang_the_sender():
    path, proc, _ = _start_receiver()
    sender = HostTransport("p")
    sender.register_pool(torch.randn(_shape()), _desc("p", "unused"))
    sender.connect(_desc("d", path))
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    start = time.monotonic()
    sender.write_blocks("d", [1, 2], [3, 4])  # the mapping outlives the peer: the write lands and returns
    assert time.monotonic() - start < 1.0
    os.unlink(path)


def test_a_restarted_peer_is_written_in_its_new_pool_not_the_old_one():
    """A restarted decode worker keeps its name but publishes a new pool file: the sender maps the new one (the
    old mapping would land the KV in the dead process's memory and the new worker would decode garbage)."""
    old_path, old_proc, old_done = _start_receiver()
    new_path, new_proc, new_done = _start_receiver()
    try:
        src_pool = torch.randn(_shape())
        sender = HostTransport("p")
        sender.register_pool(src_pool, _desc("p", "unused"))
        sender.connect(_desc("d", old_path))
        sender.write_blocks("d", [1, 2], [5, 6])
        old_done.set()
        old_proc.join(10)
        sender.connect(_desc("d", new_path))  # the same agent, restarted
        sender.write_blocks("d", [7, 8, 9], [5, 6, 20])
        received = torch.from_file(new_path, shared=True, size=src_pool.numel(), dtype=torch.float32).view(_shape())
        assert torch.equal(received[[5, 6, 20]], src_pool[[7, 8, 9]])
        old = torch.from_file(old_path, shared=True, size=src_pool.numel(), dtype=torch.float32).view(_shape())
        assert torch.equal(old[[5, 6]], src_pool[[1, 2]]) and old[20].abs().sum() == 0
    finally:
        new_done.set()
        new_proc.join(10)
        os.unlink(old_path)
        os.unlink(new_path)


def test_block_runs_coalesce_adjacent_pairs():
    assert block_runs([1, 2, 3, 7, 8], [10, 11, 12, 20, 22]) == [(1, 10, 3), (7, 20, 1), (8, 22, 1)]
    with pytest.raises(TransferError):
        block_runs([1], [])
