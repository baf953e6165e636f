"""Greedy generation through the engine gives exactly transformers' tokens on the same weights (fp32)."""

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.helpers import hf_greedy, make_tiny_model

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about paged attention."}],
]


def test_demo_gguf_greedy_matches_transformers(demo_engine, demo_hf):
    hf_model, hf_tok = demo_hf
    prompts = [demo_engine.tokenizer.encode_chat(m) for m in CHATS]
    results = demo_engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    for prompt, res in zip(prompts, results, strict=True):
        expected = hf_greedy(hf_model, prompt, 24)
        assert res.token_ids == expected
        assert res.text == hf_tok.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama", "qwen3_moe", "mixtral", "qwen2_moe"])
def test_random_model_greedy_matches_transformers(kind, tmp_path):
    hf_model = make_tiny_model(kind, tmp_path, seed=1, shard=kind == "qwen2")
    engine = LLMEngine(EngineConfig(model=str(tmp_path), kv_cache_bytes=8 << 20, max_num_batched_tokens=64))
    assert engine.model_config.architecture == kind
    prompts = [[(7 * i + 3 * j) % 290 + 1 for j in range(n)] for i, n in enumerate([5, 37, 100])]
    results = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0))
    for prompt, res in zip(prompts, results, strict=True):
        assert res.token_ids == hf_greedy(hf_model, prompt, 20)
