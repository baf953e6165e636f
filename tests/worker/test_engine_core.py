"""The engine core and its frontend's client, over a real socket pair: one message a step carrying every
running request's token (token-exact against a blocking run), aborts that free blocks at once, refusals,
calls, and a failure the frontend hears even while the loop is stuck."""

import asyncio
import socket
import threading
from types import SimpleNamespace

import pytest

from engine.config import EngineConfig
from engine.errors import EngineDeadError, RequestError
from engine.sampling_params import SamplingParams
from protocol.kv_events import KVEventKind
from worker.config import WorkerConfig
from worker.engine_client import EngineClient
from worker.engine_core import EngineCore
from worker.ipc import Hello
from worker.shard import EngineShard

CHATS = ["List three colours.", "What is 2+2?", "Name a fruit."]


@pytest.fixture(scope="module")
def shard(demo_gguf):
    s = EngineShard(WorkerConfig(role="decode", name="core-test", engine=EngineConfig(
        model=str(demo_gguf), kv_cache_bytes=32 << 20)))
    yield s
    s.close()


class Frontend:
    """What a frontend sees: every Step in order, and why the engine died."""

    def __init__(self):
        self.steps, self.dead = [], []
        self.changed = asyncio.Event()

    def on_step(self, step):
        self.steps.append(step)
        self.changed.set()

    def on_dead(self, message):
        self.dead.append(message)
        self.changed.set()

    async def until(self, predicate, timeout_s: float = 60.0):
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def outs(self, rid: str) -> list:
        return [o for s in self.steps for o in s.outs if o.request_id == rid]


@pytest.fixture
async def connected(shard):
    ours, theirs = socket.socketpair()
    core = EngineCore(shard, ours)
    fe = Frontend()
    core.start(Hello(WorkerConfig(role="decode", name="t", engine=shard.engine.config), {}, {}, []))
    client = await EngineClient.connect(theirs, fe.on_step, fe.on_dead, lambda: None)
    yield core, client, fe
    client.transport.close()  # the socket closes on the loop's next turn: wait off the loop
    assert await asyncio.to_thread(core.wait, 10), "the loop outlived its frontend"
    core.stop()


async def test_every_step_is_one_message_with_each_running_requests_token(connected, demo_engine):
    core, client, fe = connected
    prompts = [demo_engine.tokenizer.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (12, 8, 10)]
    expected = [r.token_ids for r in demo_engine.generate(prompts, params)]
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        client.add(f"r{i}", prompt, p)
    await fe.until(lambda: all(o.finish_reason for i in range(3) for o in fe.outs(f"r{i}")[-1:]) and
                   len([o for s in fe.steps for o in s.outs if o.finish_reason]) == 3)
    assert [[t for o in fe.outs(f"r{i}") for t in o.token_ids] for i in range(3)] == expected
    with_outs = [s for s in fe.steps if s.outs]
    for step in with_outs:  # one output a request a step at most
        ids = [o.request_id for o in step.outs]
        assert len(ids) == len(set(ids))
    # Batched: the three requests' 30 tokens came in about as many messages as the longest has tokens.
    assert len(with_outs) <= 12 + 2
    assert [o.num_output_tokens for o in fe.outs("r0")] == list(range(1, 13))
    assert fe.outs("r1")[-1].finish_reason == "length" and fe.outs("r1")[0].num_prompt_tokens == len(prompts[1])


async def test_an_abort_frees_the_requests_blocks_before_the_next_call(connected, demo_engine):
    core, client, fe = connected
    total = (await client.call("load"))["total_blocks"]
    prompt = demo_engine.tokenizer.encode_chat([{"role": "user", "content": CHATS[0]}])
    client.add("long", prompt, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    await fe.until(lambda: len(fe.outs("long")) >= 2)
    assert (await client.call("load"))["free_blocks"] < total
    client.abort("long")
    load = await client.call("load")  # messages run in order: the abort ran before this call
    assert load["free_blocks"] == total and load["running"] == 0
    seen = len(fe.outs("long"))
    await asyncio.sleep(0.2)
    assert len(fe.outs("long")) == seen  # nothing more for it


async def test_a_refused_request_comes_back_refused_and_the_engine_goes_on(connected):
    core, client, fe = connected
    client.add("empty", [], SamplingParams(max_tokens=4))
    await fe.until(lambda: any(r.request_id == "empty" for s in fe.steps for r in s.refused))
    refused = next(r for s in fe.steps for r in s.refused)
    assert refused.kind == "invalid_request" and "empty" in refused.message
    client.add("ok", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
    await fe.until(lambda: fe.outs("ok") and fe.outs("ok")[-1].finish_reason == "length")
    assert core.error is None


async def test_calls_raise_what_the_core_raised(connected):
    core, client, fe = connected
    with pytest.raises(RequestError, match="context"):
        await client.call("reserve_remote", "huge", list(range(10_000)), SamplingParams(max_tokens=1))
    with pytest.raises(RuntimeError):
        await client.call("no_such_call")
    assert (await client.call("load"))["running"] == 0


async def test_a_snapshot_is_the_cache_the_events_before_it_describe(connected, demo_engine):
    core, client, fe = connected
    prompt = demo_engine.tokenizer.encode_chat([{"role": "user", "content": "Describe the sea in detail."}])
    client.add("s", prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    await fe.until(lambda: fe.outs("s") and fe.outs("s")[-1].finish_reason)
    held = await client.call("snapshot")
    stored = {h for s in fe.steps for e in s.events if e.kind is KVEventKind.STORED for h in e.block_hashes}
    assert stored and stored <= set(held)  # every block the events announced, in the snapshot taken after them


async def test_a_dead_rank_reaches_the_frontend_while_the_loop_is_stuck_and_stays_the_cause():
    release = threading.Event()

    class StuckInACollective:
        def has_unfinished(self) -> bool:
            return True

        def step(self):
            release.wait(10)
            raise RuntimeError("gloo: read error (connection reset by peer)")

    ours, theirs = socket.socketpair()
    core = EngineCore(SimpleNamespace(engine=StuckInACollective(), descriptor=None), ours)
    fe = Frontend()
    core.start(Hello(WorkerConfig(role="decode", name="t", engine=EngineConfig(model="x")), {}, {}, []))
    client = await EngineClient.connect(theirs, fe.on_step, fe.on_dead, lambda: None)
    pending = asyncio.ensure_future(client.call("load"))  # queued behind the stuck step
    await asyncio.sleep(0.1)
    core.fail(RuntimeError("rank 1 of worker w died"))
    await fe.until(lambda: fe.dead)
    assert fe.dead == ["rank 1 of worker w died"]
    with pytest.raises(EngineDeadError, match="rank 1"):
        await pending
    release.set()
    assert await asyncio.to_thread(core.wait, 10)
    assert core.error == "rank 1 of worker w died"  # the collective's error, its echo, did not replace it
    with pytest.raises(EngineDeadError):
        await client.call("load")
    client.transport.close()
    core.stop()


async def test_the_frontend_leaving_stops_the_loop(shard):
    ours, theirs = socket.socketpair()
    core = EngineCore(shard, ours)
    core.start(Hello(WorkerConfig(role="decode", name="t", engine=shard.engine.config), {}, {}, []))
    theirs.recv(1 << 16)  # the Hello
    theirs.close()
    assert core.wait(10) and core.error is None
    core.stop()
