"""On the GPU: a prefill worker and a decode worker moving KV through NIXL give the same greedy tokens as one
engine doing everything (random-weight Llama, float32, torch attention: the same seeded weights everywhere)."""

import json

import httpx
import pytest

from tests.helpers import require, write_tiny_tokenizer

pytestmark = pytest.mark.gpu

TINY = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=300, max_position_embeddings=2048, rope_theta=10000.0,
            tie_word_embeddings=False, rms_norm_eps=1e-5)


def test_kv_through_nixl_gives_the_same_tokens_as_local_prefill(tmp_path):
    require("nixl")
    from bench.cluster import LocalCluster

    write_tiny_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    cluster = LocalCluster(str(tmp_path), prefill=1, decode=1, worker_args=(
        "--transport", "nixl", "--load-format", "dummy", "--device", "cuda", "--dtype", "float32",
        "--attention-backend", "torch"), start_timeout_s=300)
    try:
        router = cluster.start_router("--local-prefill-tokens", "0")
        prompt = [(7 * i + 3) % 290 + 5 for i in range(150)]  # 9 full blocks and a partial one
        body = {"model": tmp_path.name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{router}/v1/completions", json=body, timeout=300).json()
        assert cluster.load(cluster.prefill_urls[0])["tokens_computed"] >= 150  # the prefill worker computed it
        assert cluster.load(cluster.decode_urls[0])["tokens_computed"] < 150  # ... the decode worker did not
    finally:
        cluster.close()
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    ref = LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy", device="cuda", dtype="float32",
                                 attention_backend="torch", kv_cache_bytes=64 << 20))
    out = ref.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert r["usage"]["completion_tokens"] == 12
    assert r["choices"][0]["text"] == out.text
