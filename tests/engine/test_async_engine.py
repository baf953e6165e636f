"""The async engine streams the same text as a blocking run, and a dropped stream frees its blocks."""

import asyncio

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

CHAT = [{"role": "user", "content": "List three colours."}]


@pytest.fixture(scope="module")
def async_engine(demo_gguf):
    eng = AsyncEngine(LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=32 << 20,
                                             enable_prefix_caching=False)))
    yield eng
    eng.shutdown()


async def test_streamed_deltas_add_up_to_the_blocking_text(async_engine, demo_engine):
    prompt = demo_engine.tokenizer.encode_chat(CHAT)
    params = SamplingParams(max_tokens=24, temperature=0, stop=("ue",))
    expected = demo_engine.generate([prompt], params)[0]
    deltas, tokens = [], []
    async for out in async_engine.generate("s1", prompt, params):
        deltas.append(out.text_delta)
        tokens += out.new_token_ids
    assert "".join(deltas) == expected.text
    assert tokens == expected.token_ids


async def test_concurrent_streams_are_independent(async_engine, demo_engine):
    prompts = [demo_engine.tokenizer.encode_chat([{"role": "user", "content": q}])
               for q in ("Hi!", "What is 2+2?", "Name a fruit.")]
    params = SamplingParams(max_tokens=12, temperature=0)
    expected = [r.token_ids for r in demo_engine.generate(prompts, params)]

    async def run(i: int) -> list[int]:
        return [t async for o in async_engine.generate(f"c{i}", prompts[i], params) for t in o.new_token_ids]

    assert await asyncio.gather(*(run(i) for i in range(3))) == expected


async def test_leaving_a_stream_early_aborts_and_frees_blocks(async_engine, demo_engine):
    pool = async_engine.engine.block_pool
    free_before = await async_engine.call(lambda e: e.block_pool.num_free_blocks)
    prompt = demo_engine.tokenizer.encode_chat(CHAT)
    stream = async_engine.generate("drop", prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    async for _ in stream:
        break
    await stream.aclose()
    await async_engine.call(lambda e: None)  # the abort is queued before this call
    assert await async_engine.call(lambda e: e.block_pool.num_free_blocks) == free_before == pool.num_blocks


async def test_bad_request_raises_in_the_caller(async_engine):
    from engine.errors import RequestError

    with pytest.raises(RequestError):
        async for _ in async_engine.generate("bad", [], SamplingParams()):
            pass


async def test_a_caller_cancelled_while_its_command_waits_leaves_the_engine_alive(async_engine):
    import threading

    gate = threading.Event()
    ran = []

    def slow(engine) -> int:
        gate.wait(5)
        ran.append(True)
        return 1

    blocker = asyncio.ensure_future(async_engine.call(slow))
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(async_engine.call(lambda e: ran.append("second") or 2))
    await asyncio.sleep(0.05)
    waiting.cancel()  # the caller leaves while its command is queued behind the slow one
    gate.set()
    assert await blocker == 1
    assert await async_engine.call(lambda e: 3) == 3  # the engine thread survived
    assert ran == [True, "second"] and async_engine.error is None  # the cancelled command still ran


def test_the_cause_given_to_fail_outlives_the_collective_error_it_causes():
    """A dead rank is reported by fail(); the engine thread, stuck in a collective with that rank, fails a
    moment later with the collective's error, which must not replace the cause."""
    import threading

    from engine.async_engine import AsyncEngine

    release = threading.Event()

    class StuckInACollective:
        def has_unfinished(self) -> bool:
            return True

        def step(self):
            release.wait(10)
            raise RuntimeError("gloo: read error (connection reset by peer)")

    eng = AsyncEngine(StuckInACollective())
    eng.fail(RuntimeError("rank 1 of worker w died"))
    release.set()
    eng._thread.join(10)
    assert not eng._thread.is_alive()
    assert str(eng.error) == "rank 1 of worker w died"
