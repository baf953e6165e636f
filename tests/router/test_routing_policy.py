"""Cache-aware routing: prefix affinity, spreading unrelated prompts, eviction, load balance."""

import random

from protocol.block_hash import hash_blocks, root_hash
from protocol.kv_events import KVEvent, KVEventKind
from protocol.messages import WorkerLoad
from router.policy import Router
from router.state import LocalState
from router.workers import Worker

ROOT = root_hash("m")


def _workers(n: int, role: str = "decode") -> list[Worker]:
    return [Worker(f"http://{role}{i}", role, healthy=True,
                   load=WorkerLoad(running=0, waiting=0, free_blocks=100, total_blocks=100, tokens_computed=0,
                                   prompt_tokens_cached=0)) for i in range(n)]


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


async def _route(state: LocalState, router: Router, prefill: list[Worker], decode: list[Worker], prompt: list[int],
                 session: str | None = None):
    hashes = hash_blocks(prompt, 16, ROOT)
    views = await state.view([w.url for w in prefill + decode], hashes)
    route = router.route(prefill, decode, views, len(prompt), session)
    await state.record_route(route.decode.url, hashes)
    if route.prefill:
        await state.record_route(route.prefill.url, hashes)
    return route


async def test_shared_prefix_conversation_goes_to_the_worker_that_holds_it():
    state, router = LocalState(10_000), Router("cache_aware", 16, local_prefill_tokens=0)
    prefill, decode = _workers(4, "prefill"), _workers(4)
    turn1 = _prompt(1, 200)
    first = await _route(state, router, prefill, decode, turn1)
    second = await _route(state, router, prefill, decode, turn1 + _prompt(2, 60))
    assert second.decode is first.decode and second.prefill is first.prefill
    assert second.decode_cached_tokens == 192


async def test_unrelated_prompts_spread_over_workers():
    state, router = LocalState(10_000), Router("cache_aware", 16)
    decode = _workers(4)
    chosen = []
    for i in range(8):
        p = _prompt(100 + i, 300)
        route = await _route(state, router, [], decode, p)
        await state.add_load(route.decode.url, 1, 0)  # still running: it adds load
        chosen.append(route.decode.url)
    assert len(set(chosen)) == 4 and max(chosen.count(u) for u in set(chosen)) == 2


async def test_evicted_blocks_stop_attracting_requests():
    state, router = LocalState(10_000), Router("cache_aware", 16)
    decode = _workers(2)
    p = _prompt(7, 320)
    h = hash_blocks(p, 16, ROOT)
    await state.apply_events(decode[1].url, [KVEvent(KVEventKind.STORED, tuple(h))])
    assert (await _route(state, router, [], decode, p)).decode is decode[1]
    await state.apply_events(decode[1].url, [KVEvent(KVEventKind.REMOVED, tuple(h[5:]))])  # evicted past block 5
    await state.apply_events(decode[0].url, [KVEvent(KVEventKind.STORED, tuple(h))])
    assert (await _route(state, router, [], decode, p)).decode is decode[0]


async def test_load_outweighs_a_small_cache_hit():
    state, router = LocalState(10_000), Router("cache_aware", 16, load_weight=1.0)
    decode = _workers(2)
    p = _prompt(9, 100)
    await state.record_route(decode[0].url, hash_blocks(p, 16, ROOT)[:1])  # 16 cached tokens
    await state.add_load(decode[0].url, 3, 5000)
    assert (await _route(state, router, [], decode, p)).decode is decode[1]


async def test_by_default_queued_work_moves_a_cached_prompt_only_when_four_times_what_its_cache_saves():
    decode = _workers(2)
    p = _prompt(11, 320)
    for queued, expected in ((1000, 0), (1500, 1)):  # 0.25 * (queued + 3 requests * 16) against 320 tokens
        state, router = LocalState(10_000), Router("cache_aware", 16)
        await state.record_route(decode[0].url, hash_blocks(p, 16, ROOT))
        await state.add_load(decode[0].url, 3, queued)
        assert (await _route(state, router, [], decode, p)).decode is decode[expected]


async def test_mostly_cached_prompt_is_prefilled_on_the_decode_worker():
    state, router = LocalState(10_000), Router("cache_aware", 16, local_prefill_tokens=64)
    prefill, decode = _workers(1, "prefill"), _workers(1)
    p = _prompt(3, 500)
    assert (await _route(state, router, prefill, decode, p)).prefill is prefill[0]
    assert (await _route(state, router, prefill, decode, p)).prefill is None  # now cached on the decode worker


async def test_round_robin_and_session_policies():
    decode = _workers(3)
    state = LocalState(100)
    rr = Router("round_robin", 16)
    assert [(await _route(state, rr, [], decode, [1])).decode.url for _ in range(3)] == [w.url for w in decode]
    sticky = Router("session", 16)
    assert len({(await _route(state, sticky, [], decode, [1], "alice")).decode.url for _ in range(5)}) == 1


def test_prefix_index_stays_bounded_per_worker_evicting_the_least_recently_used_chains():
    from router.prefix_index import PrefixIndex

    index = PrefixIndex(max_blocks_per_worker=100)
    a, b, c = list(range(0, 40)), list(range(100, 140)), list(range(200, 240))
    index.add("w", b)
    index.add("w", a)
    index.add("w", b[:10])  # b's first blocks used again; the rest of b is the least recent
    index.add("w", c)  # 120 blocks: over the bound
    held = index.by_worker["w"]
    assert 100 - 100 // 16 <= len(held) <= 100
    assert index.match("w", a) == index.match("w", c) == 40
    kept = index.match("w", b)
    assert 10 <= kept < 40  # b's tail went first; its reused prefix stayed
    assert all(h in held for h in b[:kept]) and not any(h in held for h in b[kept:])
    for i in range(50):  # many chains later, still bounded
        index.add("w", list(range(1000 + 40 * i, 1040 + 40 * i)))
    assert len(held) <= 100


def test_a_chain_longer_than_the_bound_keeps_its_prefix_as_an_engine_would():
    from router.prefix_index import PrefixIndex

    index = PrefixIndex(max_blocks_per_worker=100)
    chain = list(range(1000))
    index.add("w", chain)
    assert 100 - 100 // 16 <= index.match("w", chain) <= 100
    assert index.match("w", chain[900:]) == 0  # the tail was evicted, not the head


def test_the_prefix_index_adds_nothing_to_the_cycle_collectors_pauses():
    import gc

    from router.prefix_index import PrefixIndex

    index = PrefixIndex(max_blocks_per_worker=1000)
    for i in range(100):
        index.add(f"w{i % 4}", list(range(20 * i, 20 * i + 20)))
    index.remove("w0", [0, 1])
    # Untracked: a full collection never walks the blocks, however many (an OrderedDict would be walked).
    assert not any(gc.is_tracked(held) for held in index.by_worker.values())


async def test_short_shared_prefix_does_not_pull_everything_to_one_worker_when_nothing_is_in_flight():
    # One request at a time (nothing ever in flight): every prompt shares a 2-block preamble (a default system
    # prompt) and has a long unique tail. The 32 shared tokens must not decide; recent work does.
    state, router = LocalState(100_000), Router("cache_aware", 16)
    decode = _workers(4)
    preamble = _prompt(0, 32)
    counts = {w.url: 0 for w in decode}
    for i in range(80):
        route = await _route(state, router, [], decode, preamble + _prompt(1000 + i, 300))
        await state.record_route(route.decode.url, [], 332 - route.decode_cached_tokens)
        counts[route.decode.url] += 1
    assert max(counts.values()) / (80 / 4) <= 1.25
    # ... while a long shared prefix still wins over balance (within the guard's ratio: next test).
    long_prefix = _prompt(1, 320)
    first = await _route(state, router, [], decode, long_prefix + _prompt(2000, 20))
    await state.record_route(first.decode.url, [], 500)  # it has done more recent work than the others
    again = await _route(state, router, [], decode, long_prefix + _prompt(2001, 20))
    assert again.decode.url == first.decode.url


async def test_the_balance_guard_moves_a_hot_prefix_off_a_worker_far_over_the_mean():
    # One request at a time: a tenant's long prefix lives on one worker, which has served over three times the
    # mean of recent prompt tokens. The guard sends its next request to the least loaded worker (one miss),
    # after which the tenant has two homes and its requests go to the lighter one.
    state, router = LocalState(100_000), Router("cache_aware", 16, balance_ratio=1.1)
    decode = _workers(4)
    tenant = _prompt(3, 640)
    home = (await _route(state, router, [], decode, tenant + _prompt(3000, 20))).decode
    for w in decode:
        await state.record_route(w.url, [], 20_000 if w is home else 6_000)
    views = await state.view([w.url for w in decode], hash_blocks(tenant + _prompt(3001, 20), 16, ROOT))
    unguarded = Router("cache_aware", 16, balance_ratio=float("inf"), balance_weight=0)
    assert unguarded.route([], decode, views, 660).decode is home  # without the guard the prefix wins
    moved = await _route(state, router, [], decode, tenant + _prompt(3001, 20))
    assert moved.decode is not home and moved.decode_cached_tokens == 0
    await state.record_route(moved.decode.url, [], 660)
    again = await _route(state, router, [], decode, tenant + _prompt(3002, 20))
    assert again.decode is moved.decode and again.decode_cached_tokens == 640


async def test_new_prompts_go_where_recent_work_is_least_even_past_a_little_work_in_flight():
    # Many requests in flight make in-flight load a noisy signal; recent work is what evens the workers out
    # without moving any cached prompt. The least worked worker has one short request in flight.
    state = LocalState(100_000)
    decode = _workers(4)
    for w, tokens in zip(decode, (11_000, 10_500, 10_500, 8_000), strict=True):
        await state.record_route(w.url, [], tokens)
    await state.add_load(decode[3].url, 1, 300)
    views = await state.view([w.url for w in decode], hash_blocks(_prompt(5, 600), 16, ROOT))
    assert Router("cache_aware", 16).route([], decode, views, 600).decode is decode[3]
    by_load_only = Router("cache_aware", 16, balance_weight=0).route([], decode, views, 600).decode
    assert by_load_only is decode[1]  # nothing in flight, then fewest recent tokens
    # A cached prompt stays on a worker a little over the mean (10%).
    tenant = _prompt(6, 640)
    await state.record_route(decode[0].url, hash_blocks(tenant, 16, ROOT))
    views = await state.view([w.url for w in decode], hash_blocks(tenant + _prompt(7, 20), 16, ROOT))
    assert Router("cache_aware", 16).route([], decode, views, 660).decode is decode[0]


async def test_a_prompt_evicted_everywhere_goes_where_the_cache_turns_over_slowest():
    state = LocalState(10_000)
    decode = _workers(4)
    back = _prompt(7, 320)  # decode0 held it and evicted it: it came back
    h = hash_blocks(back, 16, ROOT)
    await state.apply_events(decode[0].url, [KVEvent(KVEventKind.STORED, tuple(h))])
    await state.apply_events(decode[0].url, [KVEvent(KVEventKind.REMOVED, tuple(h))])
    views = await state.view([w.url for w in decode], h)
    assert (views[decode[0].url].matched_blocks, views[decode[0].url].seen_blocks) == (0, 20)
    # About as busy as each other (decode3 a little less); decode2's cache took in the fewest new tokens.
    for w, new in zip(decode, (9_000, 9_000, 2_000, 9_000), strict=True):
        await state.record_route(w.url, [], 9_990 if w is decode[3] else 10_000, new_tokens=new)
    views = await state.view([w.url for w in decode], h)
    assert (await _route(state, Router("cache_aware", 16), [], decode, back)).decode is decode[2]
    assert Router("cache_aware", 16, churn_weight=0).route([], decode, views, 320).decode is decode[3]
    # A prompt no worker has seen goes by recent work alone: it is as likely not to come back.
    assert (await _route(state, Router("cache_aware", 16), [], decode, _prompt(8, 320))).decode is decode[3]


def test_an_evicted_block_is_kept_as_held_before_and_still_bounded():
    from router.prefix_index import PrefixIndex

    index = PrefixIndex(max_blocks_per_worker=100)
    chain = list(range(40))
    index.add("w", chain)
    index.remove("w", chain[10:])  # the tail evicted
    assert (index.match("w", chain), index.match_seen("w", chain)) == (10, 40)
    index.add("w", chain)  # stored again: held
    assert index.match("w", chain) == 40
    index.remove("w", chain)
    for i in range(10):  # the bound drops blocks held before like any other, oldest first
        index.add("w", list(range(1000 + 40 * i, 1040 + 40 * i)))
    assert index.match_seen("w", chain) == 0 and len(index.by_worker["w"]) <= 100
