"""KV between tensor-parallel pools: every destination head comes from exactly one source rank, whole blocks
move where two pools hold the same heads, head slices land where the heads belong."""

import pytest
import torch

from kv_transfer.descriptors import HeadSlice, PoolDescriptor, TransferError, copy_runs, shard_plan


def _pools(name: str, tp: int, total: int = 4) -> list[PoolDescriptor]:
    local = max(total // tp, 1)
    return [PoolDescriptor(f"{name}.rank{r}", "host", "", 8, 2, 4, local, 8, "float32",
                           kv_head_start=r * total // tp, total_kv_heads=total) for r in range(tp)]


def _covered(plan, dests) -> dict[str, list[int]]:
    """destination agent -> the model heads written into it, in order."""
    got: dict[str, list[int]] = {d.agent: [] for d in dests}
    for targets in plan:
        for dest, heads in targets:
            n = dest.num_kv_heads if heads is None else heads.count
            start = dest.kv_head_start + (0 if heads is None else heads.dst_start)
            got[dest.agent] += range(start, start + n)
    return {k: sorted(v) for k, v in got.items()}


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(1, 2), (2, 1), (2, 2), (1, 4), (4, 2)])
def test_every_destination_head_is_written_once(src_tp, dst_tp):
    sources, dests = _pools("prefill", src_tp), _pools("decode", dst_tp)
    covered = _covered(shard_plan(sources, dests), dests)
    for d in dests:
        assert covered[d.agent] == list(range(d.kv_head_start, d.kv_head_start + d.num_kv_heads))


def test_equal_shards_move_whole_blocks_rank_to_rank():
    plan = shard_plan(_pools("p", 2), _pools("d", 2))
    assert [[(d.agent, h) for d, h in targets] for targets in plan] == [[("d.rank0", None)], [("d.rank1", None)]]


def test_replicated_heads_are_sent_by_one_rank_only():
    # 2 KV heads on 4 ranks: ranks 0,1 hold head 0 and ranks 2,3 head 1; a one-rank decode pool needs both.
    sources = _pools("p", 4, total=2)
    plan = shard_plan(sources, _pools("d", 1, total=2))
    senders = [i for i, targets in enumerate(plan) if targets]
    assert senders == [0, 2]
    assert plan[0][0][1] == HeadSlice(0, 0, 1) and plan[2][0][1] == HeadSlice(0, 1, 1)


def test_a_head_no_source_holds_is_an_error():
    with pytest.raises(TransferError, match="no source pool holds KV head 2"):
        shard_plan(_pools("p", 2)[:1], _pools("d", 1))


def test_head_slices_land_in_the_right_heads():
    src = torch.randn(9, 2, 2, 4, 4, 8)  # 8 blocks + scratch, 4 heads
    dst = torch.zeros(9, 2, 2, 4, 2, 8)  # a rank holding heads 2, 3
    copy_runs(src, dst, [1, 2, 5], [0, 1, 7], HeadSlice(2, 0, 2))
    assert torch.equal(dst[[0, 1, 7]], src[[1, 2, 5]][..., 2:4, :])
    assert dst[[2, 3, 4, 5, 6]].abs().sum() == 0
