"""GPU engine benchmark: decode step time against the memory roofline, prefill against the bf16 matmul peak,
and transformers.generate (static cache) on the same shapes, all measured in this run.

Model: random-initialised Llama-3-8B shapes in bf16 (load_format=dummy). Run: python -m bench.engine
"""

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                 max_position_embeddings=16384, rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)


def config_folder(shapes: dict) -> Path:
    """A model folder holding only a config.json: weights are drawn at load (load_format="dummy")."""
    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(shapes))
    return folder


def read_bandwidth() -> float:
    """Bytes/s of a reduction over a 4 GiB tensor (the roofline's bandwidth), best of 10."""
    x = torch.empty(2 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        x.sum(dtype=torch.float32)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del x
    return (2 << 30) * 2 / best


def matmul_peak() -> float:
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 20 / (time.perf_counter() - t)


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch * 7 + length)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def touched_weight_bytes(engine, batch: int) -> float:
    """Bytes of weights a decode step of `batch` tokens reads: everything but the embedding table, with each
    MoE layer's experts counted as many as `batch` tokens picking top-k of E uniformly touch on average."""
    cfg = engine.model_config
    total = 0.0
    for name, p in engine.model.named_parameters():
        if "embed_tokens" in name:
            continue
        nbytes = p.numel() * p.element_size()
        if name.endswith((".w13", ".w2")):
            e, k = cfg.num_experts, cfg.num_experts_per_tok
            nbytes *= 1 - (1 - k / e) ** batch  # the expected share of experts touched
        total += nbytes
    return total


def decode_roofline_s(engine, batch: int, ctx: int, bw: float) -> float:
    """Seconds to read what a decode step of `batch` requests at `ctx` tokens must: the weights it touches and
    the requests' KV (this rank's shard of both), at `bw` bytes/s."""
    kv_token_bytes = engine.kv_layout.block_bytes // engine.kv_layout.block_size
    return (touched_weight_bytes(engine, batch) + batch * ctx * kv_token_bytes) / bw


def decode_step_time(engine, batch: int, ctx: int, steps: int) -> float:
    from engine.sampling_params import SamplingParams

    # Requests prefilled early decode while the rest prefill (one step a max_num_batched_tokens of prompt):
    # none may reach max_tokens before the timed steps are over.
    prefill_steps = -(-batch * ctx // engine.config.max_num_batched_tokens)
    params = SamplingParams(max_tokens=prefill_steps + steps + 16, temperature=0, ignore_eos=True)
    for i, p in enumerate(_prompts(batch, ctx, engine.model_config.vocab_size)):
        engine.add_request(f"d{batch}-{i}", p, params)
    while any(r.num_computed_tokens < r.num_tokens - 1 or not r.output_token_ids
              for r in engine.scheduler.requests.values()):
        engine.step()  # prefill everything first
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()  # each step ends with the host reading the sampled tokens
    elapsed = (time.perf_counter() - t) / steps
    if len(engine.scheduler.running) != batch:  # preempted for want of KV blocks: not a batch-`batch` step
        raise RuntimeError(f"only {len(engine.scheduler.running)} of {batch} requests ran at context {ctx} "
                           f"({len(engine.scheduler.requests)} unfinished): the KV pool may be too small for this "
                           "batch (more --kv-gib)")
    for rid in list(engine.scheduler.requests):
        engine.abort_request(rid)
    return elapsed


def prefill_time(engine, length: int) -> float:
    from engine.sampling_params import SamplingParams

    best = float("inf")
    for rep in range(3):
        prompt = _prompts(1, length, engine.model_config.vocab_size)[0]
        prompt[0] = 100 + rep  # a different first block each time: no prefix-cache hit
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
        best = min(best, time.perf_counter() - t)
    return best


def hf_decode_step_time(folder: Path, batch: int, ctx: int, steps: int) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.tensor(_prompts(batch, ctx, config.vocab_size), device="cuda")

    def run(n: int, m=model) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, cache_implementation="static", pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)
    result = (run(steps + 1) - run(1)) / steps
    del model, run
    gc.collect()
    torch.cuda.empty_cache()
    return result


def emit_gemv_report(bench: str, engine) -> None:
    """One JSON line a batch size and role: engine/gemv.py's Triton linear (norm / activation fused in) against
    the unfused ops it replaces, as timed (in CUDA graphs, over every layer) when the engine captured its
    graphs, and whether the engine took it."""
    graphs = engine.runner.graphs
    for bs, roles in (graphs.gemv_report if graphs is not None else {}).items():
        for role, r in roles.items():
            if r.get("best_us"):
                emit(bench, f"gemv_{role}_speedup_batch{bs}", r["unfused_us"] / r["best_us"], "x",
                     "norm/activation kernel + cuBLAS", r["unfused_us"], ratio=r["unfused_us"] / r["best_us"],
                     triton_us=r["best_us"], tile=r["tile"], chosen=r["chosen"], batch=bs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prefill", default="512,2048,8192")
    ap.add_argument("--no-hf", action="store_true")
    args, _ = ap.parse_known_args()
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    bw = read_bandwidth()
    peak = matmul_peak()
    emit("engine_gpu", "read_bandwidth", bw / 1e12, "TB/s", note="4 GiB bf16 reduction")
    emit("engine_gpu", "bf16_matmul_peak", peak / 1e12, "TFLOP/s", note="8192^3 bf16 matmul")
    folder = config_folder(LLAMA3_8B)
    batches = [int(b) for b in args.batches.split(",")]
    engine = LLMEngine(EngineConfig(model=str(folder), load_format="dummy", dtype="bfloat16",
                                    kv_cache_bytes=36 << 30, max_num_seqs=max(batches),
                                    max_num_batched_tokens=8192, enable_prefix_caching=False))
    cfg = engine.model_config
    shapes = {"model": "llama3-8b-shapes (random)", "dtype": "bfloat16", "ctx": args.ctx}
    emit_gemv_report("engine_gpu", engine)
    for b in batches:
        step = decode_step_time(engine, b, args.ctx, args.steps)
        roofline = decode_roofline_s(engine, b, args.ctx, bw)
        graphs = engine.runner.graphs
        bs = next(s for s in graphs.sizes if s >= b) if graphs is not None else None
        emit("engine_gpu", f"decode_step_ms_batch{b}", step * 1e3, "ms", "memory roofline", roofline * 1e3,
             ratio=roofline / step, batch=b, blas=graphs and graphs.blas.get(bs),
             blas_replay_ms=graphs and graphs.blas_ms.get(bs), **shapes)
    flops_per_token = touched_weight_bytes(engine, 1)  # 2 FLOPs a bf16 weight (2 bytes); dense: all are used
    for length in [int(x) for x in args.prefill.split(",")]:
        t = prefill_time(engine, length)
        attn_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length * length / 2
        achieved = (flops_per_token * length + attn_flops) / t
        emit("engine_gpu", f"prefill_tokens_per_s_{length}", length / t, "tok/s", "bf16 matmul peak (MFU)",
             peak / 1e12, ratio=achieved / peak, achieved_tflops=achieved / 1e12, **shapes)
    ours = {b: decode_step_time(engine, b, args.ctx, args.steps) for b in (1, 8)}
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    if not args.no_hf:
        for b in (1, 8):
            hf = hf_decode_step_time(folder, b, args.ctx, args.steps)
            emit("engine_gpu", f"decode_speedup_vs_transformers_batch{b}", hf / ours[b], "x",
                 "transformers.generate static cache", hf * 1e3, ratio=hf / ours[b], ours_ms=ours[b] * 1e3,
                 batch=b, **shapes)


if __name__ == "__main__":
    main()
