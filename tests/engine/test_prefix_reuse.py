"""A prompt that shares a cached prefix gives the cold run's tokens and computes only its new blocks."""

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.helpers import make_tiny_model

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def _engine(folder, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(folder), kv_cache_bytes=4 << 20, **kw))


def test_shared_prefix_computes_only_new_blocks_and_matches_cold_run(tmp_path):
    make_tiny_model("qwen2", tmp_path)
    shared = [(5 * j) % 300 + 1 for j in range(64)]  # 4 full blocks of 16
    second = shared + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]

    cold = _engine(tmp_path).generate([second], GREEDY)[0]

    warm = _engine(tmp_path)
    warm.generate([shared + [99]], GREEDY)
    before = warm.stats.num_tokens_computed
    res = warm.generate([second], GREEDY)[0]
    assert res.token_ids == cold.token_ids
    assert res.num_cached_tokens == 64
    # The 10 uncached prompt tokens, then one token per decode step after the first sampled token.
    assert warm.stats.num_tokens_computed - before == 10 + (len(res.token_ids) - 1)


def test_fully_cached_prompt_recomputes_only_its_last_block(tmp_path):
    make_tiny_model("qwen3", tmp_path)
    prompt = [(3 * j) % 300 + 1 for j in range(48)]
    engine = _engine(tmp_path)
    first = engine.generate([prompt], GREEDY)[0]
    before = engine.stats.num_tokens_computed
    again = engine.generate([prompt], GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens == 32
    assert engine.stats.num_tokens_computed - before == 16 + (len(again.token_ids) - 1)


def test_prefix_caching_off_computes_everything(tmp_path):
    make_tiny_model("qwen2", tmp_path)
    prompt = [(3 * j) % 300 + 1 for j in range(40)]
    engine = _engine(tmp_path, enable_prefix_caching=False)
    engine.generate([prompt], GREEDY)
    assert engine.generate([prompt], GREEDY)[0].num_cached_tokens == 0


def test_kv_events_report_stored_and_evicted_blocks(tmp_path):
    from protocol.block_hash import hash_blocks
    from protocol.kv_events import KVEventKind

    make_tiny_model("qwen2", tmp_path)
    # A pool of exactly 4 blocks: the second prompt must evict the first one's blocks.
    engine = _engine(tmp_path)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), kv_cache_bytes=4 * engine.kv_layout.block_bytes))
    a = [(3 * j) % 300 + 1 for j in range(33)]
    engine.generate([a], SamplingParams(max_tokens=2, temperature=0))
    events = engine.block_pool.drain_events()
    stored = [h for e in events if e.kind is KVEventKind.STORED for h in e.block_hashes]
    assert stored == hash_blocks(a, 16, engine.root_hash)[:2]
    b = [(7 * j) % 300 + 1 for j in range(60)]
    engine.generate([b], SamplingParams(max_tokens=2, temperature=0))
    removed = [h for e in engine.block_pool.drain_events() if e.kind is KVEventKind.REMOVED for h in e.block_hashes]
    assert set(stored) <= set(removed)
