"""The CUDA path (FlashInfer attention, CUDA-graph decode) agrees with the PyTorch reference on the GPU."""

import json

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

ONE_B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,  # 1.2B
             num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=32000,
             max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def one_b_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama1b")
    (folder / "config.json").write_text(json.dumps(ONE_B))
    return folder


def _engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="bfloat16", kv_cache_bytes=2 << 30,
                                  max_num_seqs=16, **kw))


def _prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab - 10, (int(L),), generator=g).tolist() for L in (17, 130, 300, 5)[:n]]


def test_flashinfer_matches_torch_backend_on_random_1b(one_b_dir):
    greedy = SamplingParams(max_tokens=12, temperature=0, logprobs=1, ignore_eos=True)
    prompts = _prompts(4, ONE_B["vocab_size"])
    ref_engine = _engine(one_b_dir, load_format="dummy", attention_backend="torch", enforce_eager=True)
    ref = ref_engine.generate(prompts, greedy)
    del ref_engine
    eager_engine = _engine(one_b_dir, load_format="dummy", attention_backend="flashinfer", enforce_eager=True)
    eager = eager_engine.generate(prompts, greedy)
    del eager_engine
    graph_engine = _engine(one_b_dir, load_format="dummy", attention_backend="flashinfer")
    assert graph_engine.runner.graphs is not None
    graphs = graph_engine.generate(prompts, greedy)
    for r, e, g in zip(ref, eager, graphs, strict=True):
        assert e.token_ids == r.token_ids
        assert g.token_ids == e.token_ids
        for a, b in zip(r.logprobs, e.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=0.05)


def test_gpu_batch_invariance_prefix_reuse_and_preemption(one_b_dir):
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = _prompts(4, ONE_B["vocab_size"])
    engine = _engine(one_b_dir, load_format="dummy")
    alone = [engine.generate([p], greedy)[0].token_ids for p in prompts]
    together = engine.generate(prompts, greedy)  # every prompt's full blocks are cached by now
    assert [r.token_ids for r in together] == alone
    assert sum(r.num_cached_tokens for r in together) > 0
    block_bytes = engine.kv_layout.block_bytes
    del engine
    tight = LLMEngine(EngineConfig(model=str(one_b_dir), device="cuda", dtype="bfloat16", load_format="dummy",
                                   kv_cache_bytes=30 * block_bytes, enable_prefix_caching=False, max_num_seqs=16))
    res = [r.token_ids for r in tight.generate(prompts, greedy)]
    assert tight.stats.num_preemptions > 0
    assert res == alone


def test_demo_model_on_gpu_matches_transformers_greedy(demo_gguf, demo_hf):
    from tests.helpers import hf_greedy

    engine = LLMEngine(EngineConfig(model=str(demo_gguf), device="cuda", dtype="bfloat16", kv_cache_bytes=1 << 30))
    hf_model, _ = demo_hf
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    res = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    assert res.token_ids == hf_greedy(hf_model, prompt, 12)
