"""NIXL transport (UCX, cuda_ipc): two processes on one GPU move scattered blocks bit-exactly, directly and
through the staging buffer, a layout mismatch is refused at handshake, and a restarted peer is reconnected."""

import multiprocessing as mp

import pytest
import torch

from kv_transfer.descriptors import LayoutMismatchError, PoolDescriptor
from tests.helpers import require

pytestmark = pytest.mark.gpu
SHAPE = (129, 8, 2, 16, 4, 64)  # 128 blocks + scratch; 128 KiB a block


def _desc(agent: str, heads: int = 4) -> PoolDescriptor:
    return PoolDescriptor(agent, "nixl", "", 128, 8, 16, heads, 64, "bfloat16")


def _receiver(descs, requests, replies, agent: str = "decode") -> None:
    from kv_transfer.nixl_transport import NixlTransport

    pool = torch.zeros(SHAPE, dtype=torch.bfloat16, device="cuda")
    t = NixlTransport(agent, staging_blocks=0)
    descs.put(t.register_pool(pool, _desc(agent)).to_dict())
    while (ids := requests.get(timeout=120)) is not None:
        torch.cuda.synchronize()
        replies.put(pool[ids].cpu().view(torch.int16).clone())  # the bytes, for an exact comparison
    t.close()


def _start_receiver(agent: str = "decode"):
    ctx = mp.get_context("spawn")
    descs, requests, replies = ctx.Queue(), ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(descs, requests, replies, agent))
    proc.start()
    return proc, PoolDescriptor.from_dict(descs.get(timeout=120)), requests, replies


@pytest.fixture(scope="module")
def peer():
    require("nixl")
    proc, desc, requests, replies = _start_receiver()
    yield desc, requests, replies
    requests.put(None)
    proc.join(30)


@pytest.mark.parametrize("path", ["direct", "staged_aligned", "staged_unaligned"])
def test_scattered_blocks_move_bit_exactly_between_processes(peer, path):
    from kv_transfer.nixl_transport import NixlTransport

    desc, requests, replies = peer
    src = torch.randn(SHAPE, device="cuda").to(torch.bfloat16)
    sender = NixlTransport(f"prefill-{path}", staging_blocks=8)
    sender.register_pool(src, _desc(f"prefill-{path}"))
    sender.connect(desc)
    g = torch.Generator().manual_seed(len(path))
    # direct: scattered on both sides (one descriptor a block); staged: scattered into one contiguous run,
    # gathered through the 8-block staging buffer in several rounds of 4 blocks. Aligned (the run starts
    # at a multiple of 4): whole chunks, one index a side, handles kept; written twice so that the second
    # write reposts them. Unaligned: the per-block lists.
    start = {"staged_aligned": 60, "staged_unaligned": 61}.get(path)
    for _ in range(2 if path == "staged_aligned" else 1):
        src_ids = torch.randperm(128, generator=g)[:20].tolist()
        dst_ids = torch.randperm(128, generator=g)[:20].tolist() if start is None else list(range(start, start + 20))
        sender.write_blocks(desc.agent, src_ids, dst_ids)
        requests.put(dst_ids)
        got = replies.get(timeout=60)
        assert torch.equal(got, src[src_ids].cpu().view(torch.int16))
    if path == "staged_aligned":
        # five chunks (15 .. 19), each from one staging half: five handles kept, the second write added none
        assert set(sender.peers[desc.agent].handles) == {(0, 15), (1, 16), (0, 17), (1, 18), (0, 19)}
    sender.close()


def test_layout_mismatch_is_refused_at_handshake(peer):
    from kv_transfer.nixl_transport import NixlTransport

    desc, _, _ = peer
    pool = torch.zeros((129, 8, 2, 16, 2, 64), dtype=torch.bfloat16, device="cuda")
    sender = NixlTransport("prefill-other", staging_blocks=0)
    sender.register_pool(pool, _desc("prefill-other", heads=2))
    with pytest.raises(LayoutMismatchError):
        sender.connect(desc)
    sender.close()


def test_a_restarted_peer_gets_a_new_connection(peer):
    """A decode worker that restarts keeps its name and publishes new NIXL metadata: the sender drops what it
    prepared for the dead process and writes into the new one's pool."""
    from kv_transfer.nixl_transport import NixlTransport

    src = torch.randn(SHAPE, device="cuda").to(torch.bfloat16)
    sender = NixlTransport("prefill-restart", staging_blocks=8)
    sender.register_pool(src, _desc("prefill-restart"))
    for life in range(2):
        proc, desc, requests, replies = _start_receiver("decode-restarting")
        try:
            sender.connect(desc)
            src_ids, dst_ids = [3 + life, 40, 41, 42], [7, 60, 61, 62]
            sender.write_blocks(desc.agent, src_ids, dst_ids)
            requests.put(dst_ids)
            assert torch.equal(replies.get(timeout=60), src[src_ids].cpu().view(torch.int16))
        finally:
            requests.put(None)
            proc.join(30)
    assert list(sender.peers) == ["decode-restarting"]
    sender.close()
