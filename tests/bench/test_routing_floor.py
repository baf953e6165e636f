"""bench.routing_floor: the timing-free replay through pdserve's policy, and the pooled-cache reference."""

from bench.routing_floor import pooled_hit_rate, replay
from bench.routing_quality import oracle_hit_rate
from router.policy import Router


def _prompt(first: int, blocks: int) -> tuple[int, list[int]]:
    """A prompt of `blocks` full blocks; hashes are distinct per `first` (chains need not be real here)."""
    return 16 * blocks, [first * 100 + i for i in range(blocks)]


def test_one_infinite_cache_hits_every_block_seen_before():
    a, b = _prompt(1, 2), _prompt(2, 3)
    longer = (16 * 4, a[1] + [7, 8])
    # a: nothing seen; b: nothing; a again: 2 blocks; a's chain grown by two blocks: its first 2 blocks.
    assert oracle_hit_rate([a, b, a, longer]) == (32 + 32) / (32 + 48 + 32 + 64)


def test_the_pooled_cache_is_one_lru_of_all_the_blocks():
    a, b = _prompt(1, 2), _prompt(2, 2)
    # Room for 2 blocks: b evicts a, so a misses again; room for 4: a hits.
    assert pooled_hit_rate([a, b, a], capacity=2) == 0
    assert pooled_hit_rate([a, b, a], capacity=4) == 32 / 96


def test_pdserves_policy_keeps_a_repeated_prompt_where_it_is_cached_and_round_robin_does_not():
    prompt = _prompt(1, 4)
    hit_rate, imbalance = replay([prompt] * 4, "pdserve cache_aware", workers=2, capacity=100)
    assert hit_rate == 3 / 4  # computed once, then found three times on the same worker
    assert imbalance == 2.0  # all of it on one worker: a quiet pool, too little work to even out
    rr_hit_rate, rr_imbalance = replay([prompt] * 4, "round_robin", workers=2, capacity=100)
    assert rr_hit_rate == 2 / 4  # computed once on each worker
    assert rr_imbalance == 1.0


def test_a_prompt_evicted_from_its_worker_is_computed_again():
    a, b = _prompt(1, 4), _prompt(2, 4)
    # One worker holding 4 blocks: b evicts a, so the third request computes a again.
    hit_rate, _ = replay([a, b, a], "pdserve cache_aware", workers=1, capacity=4)
    assert hit_rate == 0
    hit_rate, _ = replay([a, b, a], "pdserve cache_aware", workers=1, capacity=8)
    assert hit_rate == 64 / (3 * 64)


def test_emulated_requests_in_flight_are_load_that_moves_a_prompt_off_its_cache():
    prompt = _prompt(1, 4)
    # A load weight so high that one request in flight outweighs the whole prompt's cache.
    heavy = Router("cache_aware", 16, load_weight=100)
    assert replay([prompt] * 4, heavy, workers=2, capacity=100)[0] == 3 / 4  # nothing in flight: it stays put
    # The last decision in flight: the second request leaves the worker computing the first (a miss), the third
    # and fourth alternate between the two workers, which both hold it by then.
    hit_rate, imbalance = replay([prompt] * 4, heavy, workers=2, capacity=100, inflight=1)
    assert hit_rate == 2 / 4
    assert imbalance == 1.0
