"""The host tier below the KV pool (engine/kv_tiers.py, issue 35): a prefix evicted from the pool comes back
from host memory with exactly the tokens of a cold run, computing only what no tier held; the tier's size is
honoured (a block moving down is reported offloaded, and removed only once no tier holds it); blocks an admission
is loading are never dropped under it; a remote reservation counts host hits as cached."""

import threading

import pytest
import torch

from bench.cluster import wait_until
from engine.config import EngineConfig
from engine.kv_tiers import DiskTier, HostTier
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from protocol.kv_events import KVEventKind

GREEDY = SamplingParams(max_tokens=6, temperature=0)
BLOCKS = 12  # the pool: a prompt of 4 blocks and two more like it fill it
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4  # the demo model's KV block: 30 layers, k and v, 16 tokens, 3 x 64, float32


def _engine(demo_gguf, host_blocks: int) -> LLMEngine:
    e = LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=BLOCKS * BLOCK_BYTES,
                               kv_host_bytes=host_blocks * BLOCK_BYTES))
    assert e.kv_layout.block_bytes == BLOCK_BYTES and e.kv_layout.num_blocks == BLOCKS
    return e


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
    offloaded = {h for ev in events if ev.kind is KVEventKind.OFFLOADED for h in ev.block_hashes}
    assert set(tier.slots) <= offloaded and not offloaded & set(e.block_pool.cached) - stored


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


# --- the disk tier ---


def _disk_engine(demo_gguf, directory, host_blocks: int = 4, disk_blocks: int = 64) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=BLOCKS * BLOCK_BYTES,
                                  kv_host_bytes=host_blocks * BLOCK_BYTES, kv_disk_dir=str(directory),
                                  kv_disk_bytes=disk_blocks * BLOCK_BYTES))


def _push_out(e: LLMEngine) -> None:
    for topic in ("volcanoes", "violins", "winter gardens", "trains"):
        _run(e, _prompt(e, topic))
    e.host_tier.below.flush()


def test_a_prefix_pushed_past_the_host_tier_comes_back_from_disk_and_after_a_restart(demo_gguf, cold, tmp_path,
                                                                                    monkeypatch):
    e = _disk_engine(demo_gguf, tmp_path)
    target = _prompt(e, "lighthouses")
    first, _ = _run(e, target)
    _push_out(e)
    assert len(e.host_tier.slots) == 4 and len(e.host_tier.below.files) > 4  # the overflow went to disk
    again, computed = _run(e, target)
    assert again.token_ids == first.token_ids == cold(target)
    assert again.num_cached_tokens == 64 and computed == len(target) - 64 + GREEDY.max_tokens - 1
    _push_out(e)
    held = set(e.host_tier.below.held())
    e.host_tier.below.close()
    # A restart on the same directory keeps the valid blocks (and tells the routers), and serves from them.
    restarted = _disk_engine(demo_gguf, tmp_path)
    assert set(restarted.host_tier.below.held()) == held
    stored = [ev for ev in restarted.block_pool.drain_events() if ev.kind is KVEventKind.STORED]
    assert set(stored[0].block_hashes) == held
    # Its disk reads are off the engine's loop: it waits for them in the queue while the request behind it is
    # admitted and runs (reads held back here until that is seen).
    gate, started = threading.Event(), []
    load = DiskTier._load

    def slow_load(self, h):
        started.append(h)
        gate.wait(30)
        return load(self, h)

    monkeypatch.setattr(DiskTier, "_load", slow_load)
    other = _prompt(restarted, "harbours")
    restarted.add_request("target", target, GREEDY)
    restarted.add_request("other", other, GREEDY)
    tokens, cached = {"target": [], "other": []}, {}

    def step() -> None:
        for o in restarted.step():
            tokens[o.request_id] += o.new_token_ids
            cached[o.request_id] = o.num_cached_tokens

    for _ in range(3):
        step()
    wait_until(lambda: started, 10, "the disk reads to start")
    assert [r.request_id for r in restarted.scheduler.waiting] == ["target"]
    assert [r.request_id for r in restarted.scheduler.running] == ["other"]
    gate.set()
    while restarted.has_unfinished():
        step()
    assert tokens["target"] == cold(target) and cached["target"] == 64
    assert tokens["other"] == cold(other)


def test_a_corrupt_disk_block_is_computed_never_served(demo_gguf, cold, tmp_path):
    e = _disk_engine(demo_gguf, tmp_path)
    target = _prompt(e, "lighthouses")
    _run(e, target)
    _push_out(e)
    disk = e.host_tier.below
    hashes = e.kv_manager._hashes_upto(_req(target), 4)
    assert all(h in disk for h in hashes)
    victim = disk._path(hashes[2])
    raw = bytearray(victim.read_bytes())
    raw[-7] ^= 0xFF  # one flipped byte in the payload
    victim.write_bytes(bytes(raw))
    e.block_pool.drain_events()
    again, _ = _run(e, target)
    assert again.token_ids == cold(target)
    assert again.num_cached_tokens == 32  # the two blocks before the corrupt one; it and what follows computed
    assert disk.num_corrupt == 1 and not victim.exists() and hashes[2] not in disk
    removed = {h for ev in e.block_pool.drain_events() if ev.kind is KVEventKind.REMOVED for h in ev.block_hashes}
    assert hashes[2] in removed


def _req(prompt: list[int]):
    from engine.request import Request

    return Request("probe", prompt, GREEDY, 0, 0)


def test_disk_tier_checks_its_size_its_files_and_its_directory(tmp_path, caplog):
    blocks = torch.randn(6, 2, 2, 4, 1, 8)
    nbytes = blocks[0].numel() * 4
    disk = DiskTier(tmp_path / "d", 3, nbytes, tag=7)
    assert [disk.write(h, blocks[h]) for h in range(3)] == [[], [], []]
    assert disk.write(3, blocks[3]) == [0]  # the least recently used deleted to make room
    disk.flush()
    out = torch.empty_like(blocks[0])
    assert disk.read(2, out) and torch.equal(out, blocks[2])
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [f"{h:016x}.kv" for h in (1, 2, 3)]
    (tmp_path / "d" / f"{1:016x}.kv").write_bytes(b"short")  # truncated
    disk.close()
    again = DiskTier(tmp_path / "d", 3, nbytes, tag=7)  # a restart: the valid files stay
    assert sorted(again.held()) == [2, 3]
    other = DiskTier(tmp_path / "d", 3, nbytes, tag=8)  # another model's tier on the same directory: cleared
    assert other.held() == [] and not list((tmp_path / "d").iterdir())
    (tmp_path / "ro").write_text("a file where the directory should be")
    broken = DiskTier(tmp_path / "ro", 3, nbytes, tag=7)
    assert broken.broken is not None and broken.write(1, blocks[1]) is None
    assert sum("turned off" in r.message for r in caplog.records) == 1


def test_disk_reads_ahead_are_bounded_and_keep_their_blocks(tmp_path, monkeypatch):
    """At most `keep` blocks are read or held for their requests at once, a run started whole or not at all
    (two runs never hold each other's room); a block being fetched is made most recently used, so writes of
    other blocks meanwhile do not drop it; read blocks nobody asks for any more are dropped."""
    import engine.kv_tiers as kv_tiers

    blocks = torch.arange(8 * 4, dtype=torch.float32).view(8, 4)
    disk = DiskTier(tmp_path, 8, blocks[0].numel() * 4, tag=3)
    for h in range(8):
        disk.write(h, blocks[h])
    disk.flush()
    gate = threading.Event()
    load = DiskTier._load
    monkeypatch.setattr(DiskTier, "_load", lambda self, h: gate.wait(30) and load(self, h))
    assert disk.fetch([0, 1, 2], keep=4) is True and sorted(disk.reads) == [0, 1, 2]
    assert disk.fetch([3, 4], keep=4) is True and sorted(disk.reads) == [0, 1, 2]  # no room for the whole run
    disk.write(100, blocks[0])  # room for a new block: the least recently used goes, not one being fetched
    assert all(h in disk for h in (0, 1, 2, 3, 4)) and 5 not in disk
    gate.set()
    while disk.fetch([0, 1, 2], keep=4):
        pass
    out = torch.empty(4)
    for h in (0, 1, 2):  # the first run's request takes its blocks
        assert disk.read(h, out) and torch.equal(out, blocks[h])
    assert disk.fetch([3, 4], keep=4) is True and sorted(disk.reads) == [3, 4]  # now the second starts
    while disk.fetch([3, 4], keep=4):
        pass
    disk.flush()  # block 100 on disk (its bytes still in memory are taken without a read)
    monkeypatch.setattr(kv_tiers, "STALE_READ_S", 0.0)  # the second run's request went away
    assert disk.fetch([6, 7, 100], keep=4) is True and sorted(disk.reads) == [6, 7, 100]
    disk.close()


def test_an_eviction_bigger_than_the_host_tier_lands_on_disk_byte_for_byte(tmp_path):
    pool = torch.randn(9, 2, 2, 4, 1, 8)
    disk = DiskTier(tmp_path, 16, pool[0].numel() * 4, tag=1)
    tier = HostTier(2, pool, disk)
    assert tier.offload([(b, 100 + b) for b in range(6)]) == []  # six blocks, two slots: four go down at once
    assert tier.offload([(6, 106), (7, 107)]) == []  # and the two in the slots make room
    disk.flush()
    out = torch.empty_like(pool[0])
    assert sorted(disk.files) == [100 + b for b in range(6)] and sorted(tier.slots) == [106, 107]
    for h in list(disk.files):
        assert disk.read(h, out) and torch.equal(out, pool[h - 100]), h


def test_a_tier_dropping_its_copy_of_a_block_back_in_the_pool_does_not_report_it_removed():
    from engine.block_pool import BlockPool

    pool = torch.randn(5, 2, 2, 4, 1, 8)
    tier = HostTier(1, pool)
    bp = BlockPool(4, evict_to=tier.offload)
    first = bp.allocate(4)
    bp.cache_blocks(first, [1, 2, 3, 4], 0)
    bp.release(first)
    bp.drain_events()
    bp.allocate(1)  # evicts a block into the tier (the tail of the sequence first)
    [(kind, (x,))] = [(e.kind, e.block_hashes) for e in bp.drain_events()]
    assert kind is KVEventKind.OFFLOADED
    [back] = bp.allocate(1)  # evicts another: the one-slot tier drops x (gone) to hold it
    assert (KVEventKind.REMOVED, (x,)) in [(e.kind, e.block_hashes) for e in bp.drain_events()]
    bp.cache_blocks([back], [x], 0)  # x computed again, in the pool
    bp.drain_events()
    bp.report_removed([x, 9])  # a tier gave up x and 9: x is in the pool, so only 9 is gone
    assert [(e.kind, e.block_hashes) for e in bp.drain_events()] == [(KVEventKind.REMOVED, (9,))]
