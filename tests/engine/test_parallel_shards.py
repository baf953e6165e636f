"""What each tensor/expert-parallel rank holds: heads (KV heads repeated when fewer than ranks), vocabulary
rows (last shard padded), experts; sizes that do not split are refused at load with a clear error."""

import pytest

from engine.errors import ModelLoadError
from engine.parallel import HeadShard, Parallel, ParallelConfig


def _rank(rank: int, tp: int, ep: int = 1) -> Parallel:
    return Parallel(ParallelConfig(tp, ep), rank)


def test_heads_split_over_tp_ranks():
    assert [_rank(r, 2).heads(32, 8) for r in range(2)] == [HeadShard(0, 16, 0, 4), HeadShard(16, 16, 4, 4)]


def test_kv_heads_repeat_when_fewer_than_ranks():
    shards = [_rank(r, 8).heads(32, 2) for r in range(8)]
    assert [s.kv_start for s in shards] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(s.num_kv_heads == 1 and s.num_heads == 4 for s in shards)
    # Each rank's query heads use the KV head it holds (GQA group of 16 query heads a KV head).
    assert all(s.q_start // 16 == s.kv_start for s in shards)


def test_vocab_rows_cover_the_vocabulary_with_a_padded_last_shard():
    rows = [_rank(r, 2).vocab_rows(301) for r in range(2)]
    assert rows == [(0, 151), (151, 151)]  # 151 + 150 real rows, one zero row of padding


def test_experts_split_over_ep_ranks_and_tp_ranks_share_them():
    assert [_rank(r, 2, 2).experts(8) for r in range(4)] == [(0, 4), (0, 4), (4, 4), (4, 4)]
    assert [(_rank(r, 2, 2).tp_rank, _rank(r, 2, 2).ep_rank) for r in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: _rank(0, 3).heads(32, 8), "32 attention heads do not split over tp_size 3"),
    (lambda: _rank(0, 4).heads(12, 3), "3 KV heads neither split over nor divide tp_size 4"),
    (lambda: _rank(0, 1, 3).experts(8), "8 experts do not split over ep_size 3"),
    (lambda: _rank(0, 2).split(7, "intermediate_size"), "intermediate_size of 7 does not split"),
])
def test_sizes_that_do_not_split_are_refused(call, message):
    with pytest.raises(ModelLoadError, match=message):
        call()
