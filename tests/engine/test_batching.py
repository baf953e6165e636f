"""Continuous batching does not change outputs: batch invariance, chunked prefill, preemption, abort."""

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from tests.helpers import make_tiny_model

GREEDY = SamplingParams(max_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2")
    make_tiny_model("qwen2", folder, seed=3)
    return folder


def _prompts(n: int) -> list[list[int]]:
    return [[(11 * i + 5 * j) % 300 + 1 for j in range(7 + 13 * i)] for i in range(n)]


def test_request_alone_and_in_a_batch_gives_same_tokens(model_dir):
    prompts = _prompts(6)
    alone = [LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20)).generate([p], GREEDY)[0]
             for p in prompts[:2]]
    together = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20)).generate(prompts, GREEDY)
    assert [r.token_ids for r in together[:2]] == [r.token_ids for r in alone]


def test_chunked_prefill_gives_same_tokens(model_dir):
    prompts = _prompts(5)
    whole = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20)).generate(prompts, GREEDY)
    chunked_engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20,
                                            max_num_batched_tokens=8))
    chunked = chunked_engine.generate(prompts, GREEDY)
    assert [r.token_ids for r in chunked] == [r.token_ids for r in whole]
    # The prompts hold 155 tokens: with 8 tokens a step, prefill alone needs at least 20 steps.
    assert chunked_engine.stats.num_steps >= sum(map(len, prompts)) // 8


def test_preemption_recomputes_and_gives_same_tokens(model_dir):
    prompts = _prompts(6)
    roomy = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20)).generate(prompts, GREEDY)
    probe = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20))
    tight_engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=10 * probe.kv_layout.block_bytes,
                                          enable_prefix_caching=False))
    tight = tight_engine.generate(prompts, GREEDY)
    assert tight_engine.stats.num_preemptions > 0
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]
    assert tight_engine.block_pool.num_free_blocks == tight_engine.block_pool.num_blocks


def test_abort_frees_blocks_at_once(model_dir):
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_bytes=4 << 20, enable_prefix_caching=False))
    free_before = engine.block_pool.num_free_blocks
    engine.add_request("a", _prompts(3)[2], SamplingParams(max_tokens=100, temperature=0))
    engine.step()
    engine.step()
    assert engine.block_pool.num_free_blocks < free_before
    out = engine.abort_request("a")
    assert out.finished and out.finish_reason is FinishReason.ABORT
    assert engine.block_pool.num_free_blocks == free_before
    assert not engine.has_unfinished()
