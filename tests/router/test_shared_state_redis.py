"""Several routers share one prefix index and load through a real Redis, and route as one would."""

import uuid

import httpx
import pytest

from protocol.block_hash import hash_blocks, root_hash
from protocol.kv_events import KVEvent, KVEventKind
from router.state import RedisState
from tests.router.conftest import REDIS_URL, require_redis


@pytest.fixture(scope="module", autouse=True)
def redis_available():
    require_redis()


async def test_redis_state_tracks_routes_events_and_load():
    ns = f"pdserve-test-{uuid.uuid4().hex}"
    a = RedisState(REDIS_URL, ns, max_blocks_per_worker=50, router_id="a")
    b = RedisState(REDIS_URL, ns, max_blocks_per_worker=50, router_id="b")
    try:
        h = hash_blocks(list(range(160)), 16, root_hash("m"))
        await a.record_route("w1", h[:6])
        await a.add_load("w1", 2, 300)
        views = await b.view(["w1", "w2"], h)  # the other router sees it
        assert views["w1"].matched_blocks == 6 and views["w2"].matched_blocks == 0
        assert (views["w1"].inflight, views["w1"].inflight_tokens) == (2, 300)
        await b.apply_events("w1", [KVEvent(KVEventKind.REMOVED, tuple(h[3:6]))])
        view = (await a.view(["w1"], h))["w1"]
        assert (view.matched_blocks, view.seen_blocks) == (3, 6)  # evicted blocks: held before
        await a.record_route("w1", [], sent_tokens=500, new_tokens=200)
        view = (await b.view(["w1"], h))["w1"]
        assert (view.recent_tokens, view.recent_new) == (500, 200)
        await a.reset("w2", h)
        assert (await b.view(["w2"], h))["w2"].matched_blocks == 10
        await a.record_route("w3", list(range(1000, 1100)))  # bounded: 50 stay, the chain's first 50
        assert await a.redis.zcard(a._idx("w3")) == 50
        assert (await b.view(["w3"], list(range(1000, 1100))))["w3"].matched_blocks == 50
        assert await a.owns_events("w1") and not await b.owns_events("w1")  # one ingester per worker
    finally:
        keys = [k async for k in a.redis.scan_iter(f"{ns}:*")]
        if keys:
            await a.redis.delete(*keys)
        await a.close()
        await b.close()


def test_two_router_processes_sharing_redis_make_consistent_choices(routers, redis_namespace):
    ns = redis_namespace
    ra = routers("--redis-url", REDIS_URL, "--redis-namespace", ns)
    rb = routers("--redis-url", REDIS_URL, "--redis-namespace", ns)
    # One unrelated request through B only: the routers' tie-breaking counters no longer move together,
    # so only shared state can make their choices agree.
    httpx.post(f"{rb}/v1/chat/completions", timeout=30,
               json={"model": "fake", "messages": [{"role": "user", "content": "unrelated"}]})
    for c in range(8):
        system = f"Conversation {c}: " + " ".join(f"fact {c}-{i} about the ocean" for i in range(60))
        turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "hello"}]
        first = httpx.post(f"{ra}/v1/chat/completions", json={"model": "fake", "messages": turn1}, timeout=30)
        turn2 = [*turn1, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more, please"}]
        second = httpx.post(f"{rb}/v1/chat/completions", json={"model": "fake", "messages": turn2}, timeout=30)
        assert first.status_code == second.status_code == 200
        # Router B sends the second turn where router A put the first: it saw A's decision in Redis.
        assert second.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]


def test_several_router_processes_on_one_port_share_state(routers, redis_namespace, fake_urls):
    import subprocess
    import sys

    refused = subprocess.run([sys.executable, "-m", "router.main", "--processes", "2", "--decode", fake_urls[0]],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--redis-url" in refused.stderr
    router = routers("--processes", "2", "--redis-url", REDIS_URL, "--redis-namespace", redis_namespace)
    with httpx.Client(timeout=30) as one, httpx.Client(timeout=30) as other:  # two connections, two processes
        for c in range(6):
            system = f"Tenant {c}: " + " ".join(f"rule {c}-{i} of the house" for i in range(60))
            turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "hello"}]
            turn2 = [*turn1, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
            first = one.post(f"{router}/v1/chat/completions", json={"model": "fake", "messages": turn1})
            second = other.post(f"{router}/v1/chat/completions", json={"model": "fake", "messages": turn2})
            assert first.status_code == second.status_code == 200
            assert (second.json()["choices"][0]["message"]["content"]
                    == first.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("shared", [False, True])
async def test_lower_tier_blocks_are_held_counted_apart_and_preferred_over_nothing(shared):
    """A worker that moved a prompt's tail to its host tier (`offloaded`) still holds it: routing prefers it
    over a worker holding nothing, and a worker holding it all in its device pool over both."""
    from router.policy import Router
    from router.state import LocalState
    from tests.router.test_routing_policy import _workers

    ns = f"pdserve-test-{uuid.uuid4().hex}"
    state = RedisState(REDIS_URL, ns, max_blocks_per_worker=500, router_id="a") if shared else LocalState(500)
    try:
        prompt = list(range(320))
        h = hash_blocks(prompt, 16, root_hash("m"))
        decode = _workers(3)
        near, far, empty = (w.url for w in decode)
        for url in (near, far):
            await state.apply_events(url, [KVEvent(KVEventKind.STORED, tuple(h))])
        await state.apply_events(far, [KVEvent(KVEventKind.OFFLOADED, tuple(h[12:]))])
        views = await state.view([near, far, empty], h)
        assert [(views[u].matched_blocks, views[u].lower_blocks) for u in (near, far, empty)] == \
            [(20, 0), (20, 8), (0, 0)]
        await state.apply_events(far, [KVEvent(KVEventKind.REMOVED, tuple(h[16:]))])  # gone from its tiers too
        view = (await state.view([far], h))[far]
        assert (view.matched_blocks, view.lower_blocks, view.seen_blocks) == (16, 4, 20)
        router = Router("cache_aware", 16, local_prefill_tokens=0)
        assert router.route([], decode, views, len(prompt)).decode.url == near
        views.pop(near)
        assert router.route([], decode[1:], views, len(prompt)).decode.url == far
        route = router.route([], decode[1:], views, len(prompt))
        assert route.decode_cached_tokens == 320  # a lower-tier hit is cached: no remote prefill for it
    finally:
        if shared:
            keys = [k async for k in state.redis.scan_iter(f"{ns}:*")]
            if keys:
                await state.redis.delete(*keys)
        await state.close()
