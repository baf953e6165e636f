"""Cache-aware routing: prefix affinity, spreading unrelated prompts, eviction, load balance."""

import random

from protocol.block_hash import hash_blocks, root_hash
from protocol.messages import WorkerLoad
from router.policy import Router
from router.prefix_index import PrefixIndex
from router.workers import Worker

ROOT = root_hash("m")


def _workers(n: int, role: str = "decode") -> list[Worker]:
    return [Worker(f"http://{role}{i}", role, healthy=True,
                   load=WorkerLoad(running=0, waiting=0, free_blocks=100, total_blocks=100, tokens_computed=0,
                                   prompt_tokens_cached=0)) for i in range(n)]


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def test_shared_prefix_conversation_goes_to_the_worker_that_holds_it():
    index = PrefixIndex()
    router = Router("cache_aware", index, 16, local_prefill_tokens=0)
    prefill, decode = _workers(4, "prefill"), _workers(4)
    turn1 = _prompt(1, 200)
    h1 = hash_blocks(turn1, 16, ROOT)
    first = router.route(prefill, decode, h1, len(turn1))
    index.add(first.decode.url, h1)
    index.add(first.prefill.url, h1)
    turn2 = turn1 + _prompt(2, 60)
    h2 = hash_blocks(turn2, 16, ROOT)
    second = router.route(prefill, decode, h2, len(turn2))
    assert second.decode is first.decode and second.prefill is first.prefill
    assert second.decode_cached_tokens == 192


def test_unrelated_prompts_spread_over_workers():
    index = PrefixIndex()
    router = Router("cache_aware", index, 16)
    decode = _workers(4)
    chosen = []
    for i in range(8):
        p = _prompt(100 + i, 300)
        route = router.route([], decode, hash_blocks(p, 16, ROOT), len(p))
        route.decode.inflight += 1  # still running: it adds load
        index.add(route.decode.url, hash_blocks(p, 16, ROOT))
        chosen.append(route.decode.url)
    assert len(set(chosen)) == 4 and max(chosen.count(u) for u in set(chosen)) == 2


def test_evicted_blocks_stop_attracting_requests():
    index = PrefixIndex()
    router = Router("cache_aware", index, 16)
    decode = _workers(2)
    p = _prompt(7, 320)
    h = hash_blocks(p, 16, ROOT)
    index.add(decode[1].url, h)
    assert router.route([], decode, h, len(p)).decode is decode[1]
    index.remove(decode[1].url, h[5:])  # the worker evicted everything past block 5
    index.add(decode[0].url, h)
    assert router.route([], decode, h, len(p)).decode is decode[0]


def test_load_outweighs_a_small_cache_hit():
    index = PrefixIndex()
    router = Router("cache_aware", index, 16, load_weight=1.0)
    decode = _workers(2)
    p = _prompt(9, 100)
    h = hash_blocks(p, 16, ROOT)
    index.add(decode[0].url, h[:1])  # 16 cached tokens
    decode[0].inflight_tokens = 5000
    assert router.route([], decode, h, len(p)).decode is decode[1]


def test_mostly_cached_prompt_is_prefilled_on_the_decode_worker():
    index = PrefixIndex()
    router = Router("cache_aware", index, 16, local_prefill_tokens=64)
    prefill, decode = _workers(1, "prefill"), _workers(1)
    p = _prompt(3, 500)
    h = hash_blocks(p, 16, ROOT)
    assert router.route(prefill, decode, h, len(p)).prefill is prefill[0]
    index.add(decode[0].url, h)
    assert router.route(prefill, decode, h, len(p)).prefill is None


def test_round_robin_and_session_policies():
    decode = _workers(3)
    rr = Router("round_robin", PrefixIndex(), 16)
    assert [rr.route([], decode, [], 10).decode.url for _ in range(3)] == [w.url for w in decode]
    sticky = Router("session", PrefixIndex(), 16)
    assert len({sticky.route([], decode, [], 10, session="alice").decode.url for _ in range(5)}) == 1


def test_prefix_index_stays_bounded_per_worker():
    index = PrefixIndex(max_blocks_per_worker=100)
    index.add("w", list(range(1000)))
    assert len(index.by_worker["w"]) == 100
    assert index.match("w", list(range(900, 1000))) == 100
    assert index.match("w", [0, 1, 2]) == 0  # the oldest blocks were evicted first
