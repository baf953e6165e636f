"""Priorities and fair sharing in the engine's scheduler (issue 39): a higher-priority request (a lower value)
goes ahead of a backlog that arrived before it, and when every slot is taken by worse ones, one of them is
preempted for it (recomputed later, its output unchanged); two tenants of one priority
flooding the same worker get even shares of its tokens, whichever flooded first; a tenant that arrives late
starts level with the others instead of taking the worker until it has caught up."""

import pytest

from engine.config import EngineConfig
from engine.kv_cache_manager import LOADING
from engine.llm_engine import LLMEngine
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

SEQS = 4


@pytest.fixture(scope="module")
def shared_engine(demo_gguf):
    return LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=64 << 20, max_num_seqs=SEQS))


@pytest.fixture
def engine(shared_engine):
    """The module's engine, idle again after each test however it ended."""
    yield shared_engine
    _clear(shared_engine)


def _params(max_tokens: int, priority: int = 0, tenant: str = "") -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, priority=priority, tenant=tenant)


def _prompt(engine: LLMEngine, i: int) -> list[int]:
    return engine.tokenizer.encode(f"Request number {i} asks for a few words about the sea.")


def _clear(engine: LLMEngine) -> None:
    """Abort what is left (the next test starts on an idle engine)."""
    for rid in list(engine.scheduler.requests):
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()


def test_a_higher_priority_request_goes_ahead_of_the_backlog(engine):
    for i in range(3 * SEQS):
        engine.add_request(f"low-{i}", _prompt(engine, i), _params(6, priority=1, tenant="batch"))
    engine.step()  # the first SEQS low ones run
    engine.add_request("high", _prompt(engine, 99), _params(6, priority=0, tenant="chat"))
    first: list[str] = []  # request ids in the order of their first token
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id not in first and o.new_token_ids:
                first.append(o.request_id)
    # It waits for a slot, not for the backlog: right after the requests running when it came.
    assert first.index("high") <= SEQS, first


def test_a_higher_priority_request_preempts_a_long_running_worse_one(engine, demo_gguf):
    cold = LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=64 << 20, enable_prefix_caching=False))
    lows = {f"low-{i}": _prompt(engine, i) for i in range(SEQS)}
    for rid, prompt in lows.items():  # long answers holding every slot
        engine.add_request(rid, prompt, _params(16, priority=1, tenant="batch"))
    tokens: dict[str, list[int]] = {rid: [] for rid in [*lows, "high"]}

    def step() -> None:
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids

    for _ in range(2):
        step()
    engine.add_request("high", _prompt(engine, 99), _params(6, priority=0, tenant="chat"))
    waited, preempted = 0, engine.stats.num_preemptions
    while not tokens["high"]:
        step()
        waited += 1
    assert waited <= 3, waited  # a step to make room, one to prefill (and one more for the overlapped read)
    assert engine.stats.num_preemptions == preempted + 1
    while engine.has_unfinished():
        step()
    # The preempted request was recomputed: every answer is what it is alone.
    alone = cold.generate(list(lows.values()), _params(16))
    assert [tokens[rid] for rid in lows] == [c.token_ids for c in alone]


def _shares(engine: LLMEngine, steps: int) -> dict[str, int]:
    tokens: dict[str, int] = {}
    for _ in range(steps):
        for o in engine.step():
            tenant = o.request_id.split("-")[0]
            tokens[tenant] = tokens.get(tenant, 0) + len(o.new_token_ids)
    return tokens


def test_two_tenants_flooding_share_the_worker_evenly(engine):
    for i in range(5 * SEQS):  # a's flood is all queued before b's
        engine.add_request(f"a-{i}", _prompt(engine, i), _params(8, tenant="a"))
    for i in range(5 * SEQS):
        engine.add_request(f"b-{i}", _prompt(engine, 100 + i), _params(8, tenant="b"))
    tokens = _shares(engine, 50)  # both floods still queued throughout
    assert engine.scheduler.waiting, "the floods ran out: the window measured no contention"
    assert abs(tokens["a"] - tokens["b"]) <= 0.1 * max(tokens.values()), tokens


def test_tenants_share_the_slots_at_every_moment_not_only_on_average(engine):
    """The slots are shared out one at a time: with both tenants queued, each holds half of them, so in any
    short window both decode at the same rate, even when one's prompts are four times longer (ordered by tokens
    computed alone, the short prompts' tenant took the slots, and tenants took all of them in turns)."""
    for i in range(6 * SEQS):
        engine.add_request(f"a-{i}", _prompt(engine, i) * 4, _params(12, tenant="a"))
    for i in range(2 * SEQS):
        engine.add_request(f"b-{i}", _prompt(engine, 300 + i), _params(12, tenant="b"))
    _shares(engine, 2)  # the first prompts computed
    for _ in range(4):
        running = [r.params.tenant for r in engine.scheduler.running]
        assert running.count("a") == running.count("b") == SEQS // 2, running
        window = _shares(engine, 6)
        assert window["a"] == window["b"], window


def test_a_tenant_arriving_late_starts_level_with_the_others(engine):
    for i in range(10 * SEQS):
        engine.add_request(f"a-{i}", _prompt(engine, i), _params(8, tenant="a"))
    _shares(engine, 40)  # a alone for a while: it has been served many tokens
    for i in range(8 * SEQS):
        engine.add_request(f"c-{i}", _prompt(engine, 200 + i), _params(8, tenant="c"))  # (more than 70 steps' worth)
    _shares(engine, 10)  # a's requests running when c came finish (8 tokens each): the slots turn over
    tokens = _shares(engine, 60)
    assert engine.scheduler.waiting
    assert abs(tokens["a"] - tokens["c"]) <= 0.1 * max(tokens.values()), tokens  # c does not take the worker


# --- the scheduler alone, on a stand-in for its KV manager ---


class _Kv:
    """Blocks as the scheduler sees them: one a request, `free` of them at first; prefixes in `loading` are being read
    from disk; `short` makes the next growth fail once (the pool ran out)."""

    block_size = 16

    def __init__(self, free: int, loading: set[str] = frozenset()):
        self.blocks, self.loading_ids, self.short = free, set(loading), False

    def admit(self, req, budget):
        if req.request_id in self.loading_ids:
            return LOADING
        if self.blocks < 1:
            return None
        self.blocks -= 1
        return min(req.num_tokens - req.num_computed_tokens, budget)

    def loading(self, req):
        return req.request_id in self.loading_ids

    def grow(self, req, n):
        if self.short:
            self.short = False
            return False
        return True

    def free(self, req):  # (the scheduler frees a request's blocks through kv.free)
        self.blocks += 1


def _scheduler(kv: _Kv, seqs: int) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=seqs), kv)


def _req(rid: str, priority: int, arrival: int) -> Request:
    return Request(rid, list(range(8)), _params(16, priority=priority), 0, arrival)


def _running(s: Scheduler, kv: _Kv, *reqs: Request) -> None:
    for r in reqs:
        s.add(r)
    batch = s.schedule()
    assert {r.request_id for r in reqs} <= {r.request_id for r in batch.requests}
    for r in reqs:  # their prompts computed: each decodes a token a step from now on
        r.num_computed_tokens = r.num_tokens
        r.output_token_ids.append(1)


def test_a_better_request_whose_prefix_is_loading_preempts_nobody_until_it_can_run():
    kv = _Kv(free=8, loading={"high"})
    s = _scheduler(kv, seqs=2)
    _running(s, kv, _req("low-a", 5, 0), _req("low-b", 5, 1))
    s.add(_req("high", 0, 2))
    for _ in range(4):
        batch = s.schedule()
        assert not batch.preempted and {r.request_id for r in batch.requests} == {"low-a", "low-b"}
    kv.loading_ids.clear()  # its blocks are read: now a worse one makes room for it, and is not taken back at once
    batch = s.schedule()
    assert [r.request_id for r in batch.preempted] == ["low-b"]
    assert {r.request_id for r in batch.requests} == {"low-a", "high"}


def test_out_of_blocks_the_worst_priority_is_preempted_not_the_latest():
    kv = _Kv(free=8)
    s = _scheduler(kv, seqs=4)
    _running(s, kv, _req("low", 5, 0))
    _running(s, kv, _req("high", 0, 1))  # admitted last, as a better request is
    kv.short = True  # the pool runs out as the step grows its requests
    batch = s.schedule()
    assert [r.request_id for r in batch.preempted] == ["low"]
    assert [r.request_id for r in batch.requests] == ["high"]
