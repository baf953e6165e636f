"""The MoE path on the GPU: the grouped expert kernel agrees with one matmul pair an expert in bf16, and a
random Qwen3-MoE decodes the same greedy tokens with CUDA graphs as eagerly."""

import json

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.moe import grouped_swiglu, looped_swiglu
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

SMALL_MOE = dict(model_type="qwen3_moe", hidden_size=1024, intermediate_size=3072, moe_intermediate_size=512,
                 num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, num_hidden_layers=4,
                 num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000,
                 max_position_embeddings=4096, tie_word_embeddings=False)


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_grouped_expert_kernel_matches_a_loop_over_experts_in_bf16(rows):
    g = torch.Generator(device="cuda").manual_seed(rows)
    experts, hidden, inter = 16, 512, 256
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    ids = torch.randint(0, experts, (rows,), device="cuda", generator=g).sort().values
    counts = torch.bincount(ids, minlength=experts)
    got, ref = grouped_swiglu(x, w13, w2, counts), looped_swiglu(x, w13, w2, counts)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_moe_cuda_graph_decode_matches_eager(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL_MOE))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 31000, (n,), generator=g).tolist() for n in (9, 100, 260)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)

    def run(eager: bool) -> list[list[int]]:
        engine = LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy", device="cuda", dtype="bfloat16",
                                        kv_cache_bytes=1 << 30, max_num_seqs=8, enforce_eager=eager))
        assert (engine.runner.graphs is None) == eager
        out = [r.token_ids for r in engine.generate(prompts, params)]
        del engine
        torch.cuda.empty_cache()
        return out

    assert run(eager=False) == run(eager=True)
