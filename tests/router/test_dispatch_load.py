"""The load a request puts on its decode worker, as routing and admission see it: its uncached prompt tokens
until its first token (queued prefill work), one request until it ends."""

import asyncio
from dataclasses import dataclass

from bench.mock_server import start_in_thread
from protocol.block_hash import hash_blocks
from protocol.messages import ParamsOut
from protocol.stream_client import StreamClient
from router.channels import TokenChannels
from router.dispatch import Dispatcher
from router.metrics import RouterMetrics
from router.policy import Router
from router.state import LocalState
from router.workers import Worker


@dataclass
class DecodePool:
    workers: list[Worker]

    def pool(self, role: str) -> list[Worker]:
        return self.workers if role == "decode" else []

    def mark_failed(self, w: Worker) -> None:
        w.healthy = False


async def test_prompt_tokens_weigh_until_the_first_token_and_the_request_until_it_ends():
    _, port = start_in_thread(ttft_s=0.3, itl_s=0.2)
    url = f"http://127.0.0.1:{port}"
    worker = Worker(url, "decode", healthy=True)
    state, client = LocalState(1000), StreamClient()
    dispatcher = Dispatcher(DecodePool([worker]), Router("cache_aware", 16, local_prefill_tokens=0), state, client, TokenChannels(client),
                            RouterMetrics())
    prompt = list(range(100, 420))
    stream = dispatcher.generate("r-1", prompt, ParamsOut(max_tokens=3), hash_blocks(prompt, 16, 7))
    seen = []

    async def consume() -> None:
        async for chunk in stream:
            seen.append((chunk.completion_tokens, worker.inflight_tokens, list(state.load[url])))

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.15)  # written, no token yet: the whole prompt waits to be computed there
    assert (worker.inflight, worker.inflight_tokens, state.load[url]) == (1, 320, [1, 320])
    await task
    assert seen[0] == (1, 0, [1, 0])  # from the first token on, only the request weighs
    assert seen[-1][0] == 3
    assert (worker.inflight, worker.inflight_tokens, state.load[url]) == (0, 0, [0, 0])
    await client.close()


async def _burst(state) -> list[int]:
    """Eight unrelated prompts routed in one burst (as a tokenizer batch releases them) to four workers, one of
    which did less work recently; how many each worker was sent."""
    workers = [Worker(f"http://127.0.0.1:{start_in_thread(ttft_s=0.05, itl_s=0)[1]}", "decode", healthy=True)
               for _ in range(4)]
    before = (1000, 1000, 1000, 600)
    for w, tokens in zip(workers, before, strict=True):
        await state.record_route(w.url, [], tokens)
    await asyncio.gather(*(state.view([w.url for w in workers], []) for _ in range(8)))  # connections to Redis
    client = StreamClient()
    dispatcher = Dispatcher(DecodePool(workers), Router("cache_aware", 16, local_prefill_tokens=0), state, client, TokenChannels(client),
                            RouterMetrics())

    async def one(i: int) -> None:
        prompt = [1000 * i + k for k in range(320)]
        async for _ in dispatcher.generate(f"r-{i}", prompt, ParamsOut(max_tokens=1), hash_blocks(prompt, 16, 7)):
            pass

    try:
        await asyncio.gather(*(one(i) for i in range(8)))
        views = await state.view([w.url for w in workers], [])
    finally:
        await client.close()
    return [(views[w.url].recent_tokens - tokens) // 320 for w, tokens in zip(workers, before, strict=True)]


async def test_a_burst_of_requests_spreads_each_seeing_the_ones_routed_before_it():
    # Recorded only once written, all eight were routed on the state from before the burst: all went to the
    # worker that had done the least.
    sent = await _burst(LocalState(1000))
    assert sum(sent) == 8 and max(sent) <= 3, sent


async def test_with_redis_a_burst_spreads_each_seeing_this_routers_decisions_still_on_their_way():
    import uuid

    from router.state import RedisState
    from tests.router.conftest import REDIS_URL, require_redis

    require_redis()
    state = RedisState(REDIS_URL, f"pdserve-test-{uuid.uuid4().hex}", 1000, router_id="a")
    try:
        sent = await _burst(state)
        assert sum(sent) == 8 and max(sent) <= 3, sent
        assert not state._pending  # nothing left over once Redis holds it all
    finally:
        keys = [k async for k in state.redis.scan_iter(f"{state.ns}:*")]
        if keys:
            await state.redis.delete(*keys)
        await state.close()
