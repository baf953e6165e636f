"""The CUDA path (FlashInfer attention, CUDA-graph decode) agrees with the PyTorch reference on the GPU."""

import json

import pytest
import torch

from engine import fused
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
    kw.setdefault("dtype", "bfloat16")
    return LLMEngine(EngineConfig(model=str(path), device="cuda", kv_cache_bytes=2 << 30, max_num_seqs=16, **kw))


def _prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab - 10, (int(L),), generator=g).tolist() for L in (17, 130, 300, 5)[:n]]


def test_flashinfer_matches_torch_backend_on_random_1b(one_b_dir):
    greedy = SamplingParams(max_tokens=12, temperature=0, logprobs=5, ignore_eos=True)
    prompts = _prompts(4, ONE_B["vocab_size"])

    def run(**kw):
        engine = _engine(one_b_dir, load_format="dummy", **kw)
        out = engine.generate(prompts, greedy)
        has_graphs = engine.runner.graphs is not None
        del engine
        torch.cuda.empty_cache()
        return out, has_graphs

    ref32, _ = run(attention_backend="torch", enforce_eager=True, dtype="float32")
    torch16, _ = run(attention_backend="torch", enforce_eager=True)
    fi_eager, _ = run(attention_backend="flashinfer", enforce_eager=True)
    fi_graph, has_graphs = run(attention_backend="flashinfer")
    assert has_graphs

    def first_logprob_error(out):  # the prefill's next-token logprob, against fp32
        return max(abs(o.logprobs[0].logprob - r.logprobs[0].logprob) for o, r in zip(out, ref32, strict=True))

    # FlashInfer in bf16 is as close to fp32 as PyTorch's own bf16 attention (within a small margin).
    assert first_logprob_error(fi_eager) <= 2 * first_logprob_error(torch16) + 0.05
    # Two bf16 computations (PyTorch ops vs FlashInfer's fused kernels, which round once where PyTorch rounds
    # after every op) each sit up to ~0.25 nats off the fp32 logits, so a flip between them is a near-tie
    # within twice that; graphs replay the eager kernels, so those two agree within the tight margin.
    for ref, out in zip(torch16, fi_eager, strict=True):
        _assert_same_greedy_or_near_tie(ref, out, margin=0.5)
    for ref, out in zip(fi_eager, fi_graph, strict=True):
        _assert_same_greedy_or_near_tie(ref, out)


def _assert_same_greedy_or_near_tie(ref, out, margin: float = 0.25) -> None:
    """Greedy tokens agree; where bf16 rounding flips a choice, it is a near-tie in the reference. Logits
    come out of a bf16 matmul: around 10 their step is 0.0625, so exact ties happen and 0.25 nats is a few
    rounding steps. A real bug flips clear choices (or produces tokens outside the top 5)."""
    for i, (a, b) in enumerate(zip(ref.token_ids, out.token_ids, strict=True)):
        if a != b:
            alternatives = dict(ref.logprobs[i].top)
            assert b in alternatives, f"step {i}: {b} is not among the reference's top choices {alternatives}"
            assert alternatives[a] - alternatives[b] < margin, f"step {i}: a clear choice flipped"
            return


def test_gpu_batch_invariance_prefix_reuse_and_preemption(one_b_dir):
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=5)
    prompts = _prompts(4, ONE_B["vocab_size"])
    engine = _engine(one_b_dir, load_format="dummy")
    alone = [engine.generate([p], greedy)[0] for p in prompts]
    together = engine.generate(prompts, greedy)  # every prompt's full blocks are cached by now
    for ref, out in zip(alone, together, strict=True):
        _assert_same_greedy_or_near_tie(ref, out)
    assert sum(r.num_cached_tokens for r in together) > 0
    block_bytes = engine.kv_layout.block_bytes
    del engine
    tight = LLMEngine(EngineConfig(model=str(one_b_dir), device="cuda", dtype="bfloat16", load_format="dummy",
                                   kv_cache_bytes=30 * block_bytes, enable_prefix_caching=False, max_num_seqs=16))
    res = tight.generate(prompts, greedy)
    assert tight.stats.num_preemptions > 0
    for ref, out in zip(alone, res, strict=True):  # recomputed KV goes through the prefill kernel instead
        _assert_same_greedy_or_near_tie(ref, out)


def test_demo_model_on_gpu_matches_transformers_greedy(demo_gguf, demo_hf):
    from tests.helpers import hf_greedy

    engine = LLMEngine(EngineConfig(model=str(demo_gguf), device="cuda", dtype="bfloat16", kv_cache_bytes=1 << 30))
    hf_model, _ = demo_hf
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    res = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    assert res.token_ids == hf_greedy(hf_model, prompt, 12)


def test_fused_kernels_match_pytorch_ops_in_bf16():
    """engine/fused.py's one-kernel ops against the PyTorch path of the same modules (bf16 rounding apart)."""
    from engine.layers import MLP, RMSNorm, RotaryEmbedding
    from engine.parallel import SINGLE

    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    close = dict(rtol=2e-2, atol=2e-2)
    norm = RMSNorm(512, 1e-5).to(dev, bf16)
    norm.weight.data.normal_(1.0, 0.2)
    fused_norm = RMSNorm(512, 1e-5).to(dev, bf16)
    fused_norm.weight.data.copy_(norm.weight)
    fused_norm.use_fused = True
    for rows in (1, 7, 300):
        x, res = torch.randn(rows, 512, device=dev, dtype=bf16), torch.randn(rows, 512, device=dev, dtype=bf16)
        want, want_res = norm(x, res)
        got, got_res = fused_norm(x.clone(), res.clone())
        assert torch.equal(got_res, want_res)  # the residual add rounds the same way
        torch.testing.assert_close(got, want, **close)
        torch.testing.assert_close(fused_norm(x), norm(x), **close)
    head_norm = RMSNorm(128, 1e-6).to(dev, bf16)  # Qwen3's per-head q/k norm: [tokens, heads, head_dim]
    x = torch.randn(9, 4, 128, device=dev, dtype=bf16)
    want = head_norm(x)
    head_norm.use_fused = True
    torch.testing.assert_close(head_norm(x), want, **close)
    mlp = MLP(256, 384, SINGLE).to(dev, bf16)
    x = torch.randn(33, 256, device=dev, dtype=bf16)
    want = mlp(x)
    mlp.use_fused = True
    torch.testing.assert_close(mlp(x), want, **close)

    rotary = RotaryEmbedding(128, 4096, 500000.0, None).to(dev)
    heads, kv_heads, rows = 8, 2, 19
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * 128, device=dev, dtype=bf16)
    positions = torch.randint(0, 4096, (rows,), device=dev)
    want = rotary.rotate(qkv[:, : (heads + kv_heads) * 128].view(rows, -1, 128), rotary.lookup(positions, bf16))
    got = qkv.clone()
    fused.rotate_(positions, got[:, : heads * 128], got[:, heads * 128 : (heads + kv_heads) * 128], 128,
                  rotary.cos_sin())
    torch.testing.assert_close(got[:, : (heads + kv_heads) * 128].view(rows, -1, 128), want, **close)
    assert torch.equal(got[:, (heads + kv_heads) * 128 :], qkv[:, (heads + kv_heads) * 128 :])  # v untouched


def test_overlapped_scheduling_on_gpu_matches_one_step_at_a_time(one_b_dir):
    """Steps queued ahead of the device (CUDA graphs, FlashInfer plans, pinned copies) give the same tokens."""
    prompts = _prompts(4, ONE_B["vocab_size"])
    params = [SamplingParams(max_tokens=n, temperature=0, logprobs=5, ignore_eos=True) for n in (20, 3, 1, 14)]
    runs = {}
    for overlap in (False, True):
        engine = _engine(one_b_dir, load_format="dummy", async_scheduling=overlap)
        runs[overlap] = engine.generate(prompts, params)
        assert (engine.stats.num_overlapped_steps > 10) is overlap
        del engine
        torch.cuda.empty_cache()
    for ref, out in zip(runs[False], runs[True], strict=True):
        assert len(out.token_ids) == len(ref.token_ids)
        _assert_same_greedy_or_near_tie(ref, out)


def test_batch_one_decode_through_the_triton_gemvs_matches_the_unfused_ops(one_b_dir, monkeypatch):
    """engine/gemv.py's fused linears in the batch-1 decode graph (forced: timing may keep cuBLAS on this small
    model) give the greedy tokens of the norm/activation kernels + cuBLAS, batch-4 graphs unchanged beside
    them; and unforced, tuning times every role."""
    from engine import gemv

    greedy = SamplingParams(max_tokens=16, temperature=0, logprobs=5, ignore_eos=True)
    prompts = _prompts(3, ONE_B["vocab_size"])
    runs = {}
    for forced in (False, True):
        monkeypatch.setattr(gemv, "FORCE", {1: gemv.Tile(4, 512, 4)} if forced else None)
        monkeypatch.setattr(gemv, "ENABLED", forced)
        engine = _engine(one_b_dir, load_format="dummy")
        tiles = [getattr(layer.mlp.down_proj, "gemv_tiles", {}) for layer in engine.model.layers]
        assert all(set(t) == {1} for t in tiles) if forced else not any(tiles)
        alone = [engine.generate([p], greedy)[0] for p in prompts]  # one at a time: batch-1 steps
        runs[forced] = alone + engine.generate(prompts, greedy)  # three together: the batch-4 graph
        del engine
        torch.cuda.empty_cache()
    for ref, out in zip(runs[False], runs[True], strict=True):
        _assert_same_greedy_or_near_tie(ref, out)
    monkeypatch.setattr(gemv, "ENABLED", True)
    monkeypatch.setattr(gemv, "FORCE", None)
    engine = _engine(one_b_dir, load_format="dummy")
    report = engine.runner.graphs.gemv_report
    assert set(report) == {s for s in engine.runner.graphs.sizes if s <= gemv.MAX_TOKENS}
    for roles in report.values():
        assert set(roles) == set(gemv.ROLES)
        assert all(r["unfused_us"] > 0 and r["best_us"] > 0 for r in roles.values()), roles
