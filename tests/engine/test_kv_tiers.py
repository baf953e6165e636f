"""The host tier below the KV pool (engine/kv_tiers.py, issue 35): a prefix evicted from the pool comes back
from host memory with exactly the tokens of a cold run, computing only what no tier held; the tier's size is
honoured (least recently used dropped, and only then reported removed to the routers); blocks an admission
is loading are never dropped under it; a remote reservation counts host hits as cached."""

import pytest
import torch

from engine.config import EngineConfig
from engine.kv_tiers import HostTier
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from protocol.kv_events import KVEventKind

GREEDY = SamplingParams(max_tokens=6, temperature=0)
BLOCKS = 12  # the pool: a prompt of 4 blocks and two more like it fill it


def _engine(demo_gguf, host_blocks: int) -> LLMEngine:
    probe = LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=1 << 20))
    block = probe.kv_layout.block_bytes
    return LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=BLOCKS * block,
                                  kv_host_bytes=host_blocks * block))


def _prompt(e: LLMEngine, topic: str) -> list[int]:
    text = f"Here is a long note about {topic}, written so that it fills several blocks of the cache. " * 6
    return e.tokenizer.encode(text)[:70]  # 4 full blocks and a few tokens


def _run(e: LLMEngine, prompt: list[int]):
    before = e.stats.num_tokens_computed
    out = e.generate([prompt], GREEDY)[0]
    return out, e.stats.num_tokens_computed - before


@pytest.fixture(scope="module")
def cold(demo_gguf):
    """What each prompt gives on an engine that never saw it."""
    e = LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=64 << 20, enable_prefix_caching=False))
    return lambda prompt: e.generate([prompt], GREEDY)[0].token_ids


@pytest.mark.parametrize("host_blocks", [0, 32])
def test_an_evicted_prefix_comes_back_from_host_memory(demo_gguf, cold, host_blocks):
    e = _engine(demo_gguf, host_blocks)
    target = _prompt(e, "lighthouses")
    first, _ = _run(e, target)
    for topic in ("volcanoes", "violins", "winter gardens"):  # push the target's blocks out of the pool
        _run(e, _prompt(e, topic))
    again, computed = _run(e, target)
    assert again.token_ids == first.token_ids == cold(target)
    if host_blocks:
        assert again.num_cached_tokens == 64  # the 4 full blocks, from the host tier
        assert computed == len(target) - 64 + GREEDY.max_tokens - 1
        assert e.kv_manager.num_tier_hit_tokens == 64 and e.host_tier.num_loaded == 4
    else:
        assert again.num_cached_tokens == 0 and computed == len(target) + GREEDY.max_tokens - 1


def test_the_tier_holds_its_size_and_reports_only_what_it_drops(demo_gguf):
    e = _engine(demo_gguf, 5)
    e.block_pool.drain_events()
    prompts = [_prompt(e, t) for t in ("owls", "bread", "trains", "chess")]
    for p in prompts:
        _run(e, p)
    tier = e.host_tier
    assert len(tier.slots) == 5 and len(tier.free_slots) == 0  # never more than its size
    events = e.block_pool.drain_events()
    removed = {h for ev in events if ev.kind is KVEventKind.REMOVED for h in ev.block_hashes}
    stored = {h for ev in events if ev.kind is KVEventKind.STORED for h in ev.block_hashes}
    held = set(e.block_pool.cached) | set(tier.slots)
    assert removed == stored - held  # removed: exactly what no tier holds any longer
    assert not removed & set(tier.slots)


def test_blocks_being_loaded_are_not_dropped_and_bytes_come_back_exactly():
    pool = torch.randn(9, 2, 2, 4, 1, 8)  # 8 blocks + scratch
    tier = HostTier(3, pool)
    original = pool.clone()
    assert tier.offload([(1, 101), (2, 102), (3, 103)]) == []
    tier.keep = frozenset({101})
    assert tier.offload([(4, 104)]) == [102]  # the least recently used not kept
    assert tier.offload([(5, 105)]) == [103]
    tier.keep = frozenset({101, 104, 105})
    assert tier.offload([(6, 106)]) == [106]  # no room: it is gone itself, nothing kept is dropped
    tier.keep = frozenset()
    slots = tier.lookup([101, 104, 105, 999, 106])
    assert len(slots) == 3  # the chain stops at the first hash the tier lacks
    pool[[0, 1, 2]] = 0
    tier.load(slots, [0, 1, 2])
    assert torch.equal(pool[0], original[1]) and torch.equal(pool[1], original[4]) and torch.equal(pool[2], original[5])


def test_a_remote_reservation_counts_host_hits_as_cached(demo_gguf):
    e = _engine(demo_gguf, 32)
    target = _prompt(e, "lighthouses")
    _run(e, target)
    for topic in ("volcanoes", "violins", "winter gardens"):
        _run(e, _prompt(e, topic))
    req = e.reserve_remote("remote", target, GREEDY)
    assert req.num_cached_tokens == 64  # the prefill worker sends only the rest
    e.abort_request("remote")
