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


@pytest.mark.parametrize("kind", ["mistral", "qwen2_window"])
def test_sliding_window_matches_transformers(kind, tmp_path):
    """Prompts longer than the window, prefilled in chunks (64 tokens a step) and decoded past it."""
    import torch

    hf_model = make_tiny_model(kind, tmp_path, seed=2)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), kv_cache_bytes=8 << 20, max_num_batched_tokens=64))
    windows = engine.model_config.attention_windows()
    assert windows == ([12, 12] if kind == "mistral" else [0, 10, 10])
    prompts = [[(5 * i + 11 * j) % 290 + 1 for j in range(n)] for i, n in enumerate([9, 40, 100])]
    # The window changes what the model computes here (so ignoring it could not pass): transformers' logits
    # for the longest prompt with the window and with full attention differ.
    ids = torch.tensor([prompts[2]])
    with torch.no_grad():
        windowed = hf_model(ids).logits
        hf_model.config.sliding_window = None
        hf_model.config.layer_types = ["full_attention"] * hf_model.config.num_hidden_layers
        full = type(hf_model)(hf_model.config).eval()
        full.load_state_dict(hf_model.state_dict())
        assert not torch.allclose(windowed, full(ids).logits, atol=1e-3)
    hf_model = make_tiny_model(kind, tmp_path / "again", seed=2)  # the windowed reference, as saved
    results = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0))
    for prompt, res in zip(prompts, results, strict=True):
        assert res.token_ids == hf_greedy(hf_model, prompt, 20)
