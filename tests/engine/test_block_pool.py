"""The block pool's reference counting, LRU eviction and events."""

import pytest

from engine.block_pool import BlockPool, NoFreeBlocksError
from protocol.kv_events import KVEventKind


def test_block_returns_to_pool_when_last_reference_drops():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.take(blocks)  # a second owner
    pool.release(blocks)
    assert pool.num_free_blocks == 2
    pool.release(blocks)
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(blocks)


def test_cached_blocks_survive_release_and_are_found_again():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.cache_blocks(blocks, [101, 102], parent_hash=7)
    pool.release(blocks)
    assert pool.lookup_prefix([101, 102, 103]) == blocks


def test_least_recently_used_cached_block_is_evicted_first():
    pool = BlockPool(3)
    a, b = pool.allocate(1), pool.allocate(1)
    pool.cache_blocks(a, [1], 0)
    pool.cache_blocks(b, [2], 0)
    pool.release(a)
    pool.release(b)
    pool.drain_events()
    pool.allocate(2)  # the uncached block first, then the oldest cached one (a)
    assert pool.lookup_prefix([1]) == [] and pool.lookup_prefix([2]) == b
    (event,) = pool.drain_events()
    assert event.kind is KVEventKind.REMOVED and event.block_hashes == (1,)


def test_allocating_more_than_free_fails_cleanly():
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


def test_allocate_run_takes_adjacent_uncached_blocks_and_evicts_nothing():
    from engine.block_pool import BlockPool

    pool = BlockPool(32)
    a = pool.allocate(32)
    pool.cache_blocks(a[10:12], [111, 112], 0)  # blocks 10, 11 hold a cached prefix
    pool.release(a[::2])  # free but fragmented: 0, 2, 4, ...
    pool.release([9, 11])  # 8..12 free, but 10 and 11 are cached
    assert pool.allocate_run(3) is None  # no 3 adjacent free blocks that hold nothing
    pool.release([21, 23, 25])  # 20..26 free and uncached
    run = pool.allocate_run(6)
    assert run == list(range(20, 26))
    assert pool.cached == {111: 10, 112: 11}
    assert all(pool.ref_counts[b] == 1 for b in run) and pool.num_free_blocks == 16 + 2 + 3 - 6


def test_long_runs_start_on_the_transfer_alignment_when_a_free_run_allows():
    from engine.block_pool import BlockPool

    align = BlockPool.RUN_ALIGN
    pool = BlockPool(3 * align)
    pool.allocate(align + 1)  # 0 .. align taken: the first free run starts at align + 1
    assert pool.allocate_run(4) == [align + 1, align + 2, align + 3, align + 4]  # short runs: first fit
    assert pool.allocate_run(align) == list(range(2 * align, 3 * align))  # not align + 5 .. 2 * align + 4
    other = BlockPool(2 * align + 10)
    other.allocate(5)
    n = 2 * align + 5 - 5 - 1  # fits only from the start of the free blocks: no aligned start exists
    assert other.allocate_run(n) == list(range(5, 5 + n))
