"""The load a request puts on its decode worker, as routing and admission see it: its uncached prompt tokens
until its first token (queued prefill work), one request until it ends."""

import asyncio
from dataclasses import dataclass

from bench.mock_server import start_in_thread
from protocol.block_hash import hash_blocks
from protocol.messages import ParamsOut
from protocol.stream_client import StreamClient
from router.dispatch import Dispatcher
from router.metrics import RouterMetrics
from router.policy import Router
from router.state import LocalState
from router.workers import Worker


@dataclass
class OnePool:
    worker: Worker

    def pool(self, role: str) -> list[Worker]:
        return [self.worker] if role == "decode" else []

    def mark_failed(self, w: Worker) -> None:
        w.healthy = False


async def test_prompt_tokens_weigh_until_the_first_token_and_the_request_until_it_ends():
    _, port = start_in_thread(ttft_s=0.3, itl_s=0.2)
    url = f"http://127.0.0.1:{port}"
    worker = Worker(url, "decode", healthy=True)
    state, client = LocalState(1000), StreamClient()
    dispatcher = Dispatcher(OnePool(worker), Router("cache_aware", 16, local_prefill_tokens=0), state, client,
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
