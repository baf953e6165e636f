"""AsyncEngine hands a step's outputs to the event loop in one call, and a stream that was busy gets every
output that arrived meanwhile in one list (stream_batches), in order, ending at the finished one."""

import asyncio
import threading

from engine.async_engine import AsyncEngine
from engine.outputs import RequestOutput
from engine.request import FinishReason


class StubEngine:
    """One token a step for every running request; steps run only while `go` is set."""

    def __init__(self, tokens: int):
        self.tokens, self.running, self.steps = tokens, {}, 0
        self.go = threading.Event()
        self.go.set()

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def add_request(self, request_id, prompt_token_ids, params, hold_kv=False) -> None:
        self.running[request_id] = 0

    def abort_request(self, request_id) -> None:
        self.running.pop(request_id, None)

    def step(self) -> list[RequestOutput]:
        self.go.wait()
        self.steps += 1
        outs = []
        for rid, n in list(self.running.items()):
            n += 1
            done = n == self.tokens
            outs.append(RequestOutput(rid, [n], f"t{n} ", done, FinishReason.LENGTH if done else None, 3, 0, n))
            self.running[rid] = n
            if done:
                del self.running[rid]
        return outs


async def test_outputs_that_arrived_while_the_stream_was_busy_come_in_one_list():
    stub = StubEngine(tokens=6)
    engine = AsyncEngine(stub)
    try:
        batches = []
        async for batch in engine.generate_batches("r", [1, 2], None):
            batches.append([o.new_token_ids[0] for o in batch])
            if len(batches) == 1:
                await asyncio.sleep(0.3)  # busy: the engine finishes the request meanwhile
        assert [t for b in batches for t in b] == [1, 2, 3, 4, 5, 6]
        assert max(len(b) for b in batches) > 1
        assert stub.steps == 6
    finally:
        engine.shutdown()


async def test_a_step_hands_its_outputs_to_the_loop_in_one_call():
    stub = StubEngine(tokens=5)
    stub.go.clear()  # every request is added before the first step
    engine = AsyncEngine(stub)
    loop = asyncio.get_running_loop()
    calls = 0
    original = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counting
    try:
        streams = [engine.stream(f"r{i}", lambda e, i=i: e.add_request(f"r{i}", [1], None)) for i in range(20)]

        async def run(s) -> list[int]:
            return [o.new_token_ids[0] async for o in s]

        tasks = [asyncio.ensure_future(run(s)) for s in streams]
        while len(stub.running) < 20:
            await asyncio.sleep(0.01)
        stub.go.set()
        assert await asyncio.gather(*tasks) == [[1, 2, 3, 4, 5]] * 20
        # 20 answers to the start calls, then one hand-off a step (5), not one a request a step (100)
        assert stub.steps == 5
        assert calls <= 20 + 5 + 2
    finally:
        loop.call_soon_threadsafe = original
        engine.shutdown()
