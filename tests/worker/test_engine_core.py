"""The engine core and its frontend's client, over a real socket pair: one message a step carrying every
running request's token (token-exact against a blocking run), aborts that free blocks at once, refusals,
calls, and a failure the frontend hears even while the loop is stuck."""

import asyncio
import socket
import threading

import pytest

from engine.config import EngineConfig
from engine.errors import EngineDeadError, RequestError
from engine.sampling_params import SamplingParams
from kv_transfer.descriptors import TransferError
from protocol.kv_events import KVEventKind
from worker.config import WorkerConfig
from worker.engine_client import EngineClient
from worker.engine_core import EngineCore
from worker.ipc import Hello
from worker.shard import EngineShard

CHATS = ["List three colours.", "What is 2+2?", "Name a fruit."]


def _shard(model) -> EngineShard:
    return EngineShard(WorkerConfig(role="decode", name="core-test", engine=EngineConfig(
        model=str(model), kv_cache_bytes=32 << 20)))


@pytest.fixture(scope="module")
def shard(demo_gguf):
    s = _shard(demo_gguf)
    yield s
    s.close()


@pytest.fixture
def fresh_shard(demo_gguf):
    """An engine no other test used: its cache is what this test's messages describe."""
    s = _shard(demo_gguf)
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

    @property
    def load(self):
        return next(s.load for s in reversed(self.steps) if s.load is not None)


async def _connect(shard):
    ours, theirs = socket.socketpair()
    core = EngineCore(shard, ours)
    fe = Frontend()
    core.start(Hello(WorkerConfig(role="decode", name="t", engine=shard.engine.config), {}, {}, []))
    client = await EngineClient.connect(theirs, fe.on_step, fe.on_dead, lambda: None)
    return core, client, fe


async def _disconnect(core, client) -> None:
    client.transport.close()  # the socket closes on the loop's next turn: wait off the loop
    assert await asyncio.to_thread(core.wait, 10), "the loop outlived its frontend"
    core.stop()


@pytest.fixture
async def connected(shard):
    core, client, fe = await _connect(shard)
    yield core, client, fe
    await _disconnect(core, client)


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


async def test_an_abort_frees_the_requests_blocks_at_once(connected, demo_engine):
    core, client, fe = connected
    await fe.until(lambda: any(s.load for s in fe.steps))
    total = fe.load.total_blocks
    prompt = demo_engine.tokenizer.encode_chat([{"role": "user", "content": CHATS[0]}])
    client.add("long", prompt, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    await fe.until(lambda: len(fe.outs("long")) >= 2)
    assert fe.load.free_blocks < total and fe.load.running == 1
    client.abort("long")
    await fe.until(lambda: fe.load.running == 0, timeout_s=5)  # reported with the next message
    assert fe.load.free_blocks == total
    outs = len(fe.outs("long"))
    await asyncio.sleep(0.2)
    assert len(fe.outs("long")) == outs  # nothing more for it


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
        await client.reserve_remote("huge", list(range(10_000)), SamplingParams(max_tokens=1))
    with pytest.raises(TransferError, match="gone"):
        await client.send_kv("never-held", [], [], 0, 5.0)
    block_ids, cached = await client.reserve_remote("fits", [1, 2, 3] * 12, SamplingParams(max_tokens=1))
    assert len(block_ids) == 3 and cached == 0
    client.abort("fits")
    assert core.error is None


async def test_held_blocks_stay_until_their_send_has_ended_whatever_release_comes(fresh_shard, monkeypatch):
    """A prefill worker's KV is read by a transfer thread: a Release (or an Abort) that comes meanwhile frees
    the blocks only once the transfer has ended, never under it."""
    gate, reading = threading.Event(), threading.Event()

    def slow_send(targets, src, dst, timeout_s):
        reading.set()
        gate.wait(10)
        return 1234

    monkeypatch.setattr(fresh_shard, "send", slow_send)
    core, client, fe = await _connect(fresh_shard)
    await fe.until(lambda: any(s.load for s in fe.steps))
    total = fe.load.total_blocks
    client.add("held", list(range(1, 40)), SamplingParams(max_tokens=1, temperature=0), hold_kv=True)
    await fe.until(lambda: fe.outs("held") and fe.outs("held")[-1].finish_reason)
    dest = fresh_shard.descriptor.to_dict()
    sending = asyncio.ensure_future(client.send_kv("held", [dest], [7, 8, 9], 0, 5.0))
    await asyncio.to_thread(reading.wait, 5)
    client.release("held")
    client.abort("held")
    seen = len(fe.steps)
    await fe.until(lambda: len(fe.steps) > seen)
    assert fe.load.free_blocks < total  # still held: the send is reading them
    gate.set()
    assert await sending == 1234
    await fe.until(lambda: fe.load.free_blocks == total and fe.load.kv_bytes_sent == 1234)
    await _disconnect(core, client)


async def test_the_events_describe_the_engines_cache_exactly(fresh_shard, demo_engine):
    from worker.events import EventLog

    core, client, fe = await _connect(fresh_shard)
    for i, text in enumerate(["Describe the sea in detail.", "Describe the sea in detail, please.", "Hi"]):
        prompt = demo_engine.tokenizer.encode_chat([{"role": "user", "content": text}])
        client.add(f"s{i}", prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    await fe.until(lambda: all(fe.outs(f"s{i}") and fe.outs(f"s{i}")[-1].finish_reason for i in range(3)))
    log = EventLog()
    for step in fe.steps:
        log.extend(step.events)
    seq, held = log.snapshot()
    assert held and seq == log.seq
    # The loop is idle (no request left): its block pool can be read from here.
    assert set(held) == set(core.engine.block_pool.cached)
    assert any(e.kind is KVEventKind.STORED for s in fe.steps for e in s.events)
    await _disconnect(core, client)


async def test_a_dead_rank_reaches_the_frontend_while_the_loop_is_stuck_and_stays_the_cause(fresh_shard, monkeypatch):
    release = threading.Event()

    def stuck_in_a_collective():
        release.wait(10)
        raise RuntimeError("gloo: read error (connection reset by peer)")

    monkeypatch.setattr(fresh_shard.engine, "step", stuck_in_a_collective)
    monkeypatch.setattr(fresh_shard.engine, "has_unfinished", lambda: True)
    core, client, fe = await _connect(fresh_shard)
    pending = asyncio.ensure_future(client.reserve_remote("x", [1], SamplingParams()))  # queued behind the step
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
        await client.reserve_remote("y", [1], SamplingParams())
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
