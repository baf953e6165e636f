"""How many streamed tokens a worker process can hand from its engine thread to its HTTP streams (CPU; JSON
lines). The device is a stub that takes --step-ms a step and yields one token for every running request, so
what is measured is the host path alone: AsyncEngine's hand-off from the engine thread to the event loop and
the decode worker's per-token serialization and writes, with hundreds of requests a step.

Two ways in one run: a step's outputs handed over in one call per event loop and each stream writing what
arrived together at once (`AsyncEngine.stream_batches`, what the decode worker does), against one hand-off
and one write a token a request (the way before). Reported: tokens/s, steps/s against the stub's own rate,
and the gap between a request's tokens (p50, p90).

  python -m bench.engine_delivery [--requests 256] [--step-ms 5] [--tokens 100]
"""

import argparse
import asyncio
import time
from collections.abc import Callable

import numpy as np

from bench.common import emit
from decode_worker.app import _chunk
from engine.async_engine import AsyncEngine
from engine.outputs import FinishReason, RequestOutput


class StubEngine:
    """The LLMEngine surface AsyncEngine drives; step() sleeps like a device step (the GIL is free) and then
    returns one output for every running request, as the real engine's host side would."""

    def __init__(self, step_s: float, tokens: int):
        self.step_s, self.tokens = step_s, tokens
        self.running: dict[str, int] = {}
        self.steps = 0

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params, hold_kv: bool = False) -> None:
        self.running[request_id] = 0

    def abort_request(self, request_id: str) -> None:
        self.running.pop(request_id, None)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)
        self.steps += 1
        outs = []
        for rid, n in list(self.running.items()):
            n += 1
            done = n >= self.tokens
            outs.append(RequestOutput(rid, [1000 + n], " tok", done, FinishReason.LENGTH if done else None, 1000, 0, n))
            if done:
                del self.running[rid]
            else:
                self.running[rid] = n
        return outs


class PerTokenAsyncEngine(AsyncEngine):
    """The way before: one call_soon_threadsafe a request a step."""

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)


class TokenGaps:
    """The gaps between each stream's tokens, over many streams; n tokens that arrive at once share the wait
    since that stream's last arrival (n gaps of a 1/n each)."""

    def __init__(self):
        self.gaps: list[float] = []
        self.tokens = 0

    def stream(self) -> Callable[[int], None]:
        """A new stream's `arrived(n)`."""
        last = None

        def arrived(n: int) -> None:
            nonlocal last
            now = time.perf_counter()
            if last is not None:
                self.gaps.extend([(now - last) / n] * n)
            last, self.tokens = now, self.tokens + n

        return arrived


async def _run(engine: AsyncEngine, requests: int, batched: bool) -> tuple[float, list[float]]:
    seen = TokenGaps()

    async def one(i: int) -> None:
        wrote = seen.stream()  # n tokens went out in one write
        if batched:
            async for batch in engine.generate_batches(f"r{i}", [1, 2, 3], None):
                b"".join([_chunk(o) for o in batch])  # what the decode worker writes
                await asyncio.sleep(0)  # the write: a trip through the loop, as a server's send is
                wrote(len(batch))
        else:
            async for out in engine.generate(f"r{i}", [1, 2, 3], None):
                _chunk(out)
                await asyncio.sleep(0)
                wrote(1)

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return seen.tokens / (time.perf_counter() - t), seen.gaps


def measure(cls: type, requests: int, step_s: float, tokens: int, batched: bool) -> dict:
    stub = StubEngine(step_s, tokens)
    engine = cls(stub)
    try:
        t = time.perf_counter()
        rate, gaps = asyncio.run(_run(engine, requests, batched))
        steps_per_s = stub.steps / (time.perf_counter() - t)
    finally:
        engine.shutdown()
    return {"tokens_per_s": rate, "steps_per_s": steps_per_s, "gap_p50_ms": float(np.percentile(gaps, 50)) * 1e3,
            "gap_p90_ms": float(np.percentile(gaps, 90)) * 1e3}


def stub_args(doc: str) -> argparse.Namespace:
    """The stub-engine benches' options: how many streams, the stub's step time, tokens a stream."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--tokens", type=int, default=100)
    return ap.parse_args()


def main() -> None:
    a = stub_args(__doc__)
    step_s = a.step_ms / 1e3
    old = measure(PerTokenAsyncEngine, a.requests, step_s, a.tokens, batched=False)
    new = measure(AsyncEngine, a.requests, step_s, a.tokens, batched=True)
    common = {"requests": a.requests, "step_ms": a.step_ms, "tokens_per_request": a.tokens,
              "stub_steps_per_s": 1 / step_s}
    emit("engine_delivery", "tokens_per_s", new["tokens_per_s"], "tok/s", "one hand-off and write a token",
         old["tokens_per_s"], **common)
    emit("engine_delivery", "steps_per_s", new["steps_per_s"], "steps/s", "one hand-off and write a token",
         old["steps_per_s"], stub_ratio=new["steps_per_s"] * step_s, old_stub_ratio=old["steps_per_s"] * step_s,
         **common)
    emit("engine_delivery", "token_gap_p90_ms", new["gap_p90_ms"], "ms", "one hand-off and write a token",
         old["gap_p90_ms"], gap_p50_ms=new["gap_p50_ms"], old_gap_p50_ms=old["gap_p50_ms"], **common)


if __name__ == "__main__":
    main()
