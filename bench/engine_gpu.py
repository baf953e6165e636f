"""GPU engine benchmark: decode step time against the memory roofline, prefill against the bf16 matmul peak,
and transformers.generate (static cache) on the same shapes, all measured in this run.

Model: random-initialised Llama-3-8B shapes in bf16 (load_format=dummy). Run: python -m bench.engine

The roofline and MFU lines are held against hardware limits measured in the run (read bandwidth, matmul peak):
they carry hardware_limit, their ratio the share of the limit reached. The transformers lines are decode
tokens/s, their ratio our speedup.

--quick (python -m bench.engine_gpu --quick): the same measuring code on the CPU: a 4-layer Llama of hidden
size 256 (random, float32), the PyTorch attention backend, batches 1 and 8 at context 128, prefill of 128 and
512 tokens, the CPU's read bandwidth (256 MiB float32 reduction) and float32 matmul peak (1024^3) as the limits.
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


# --quick: a small Llama that runs on the CPU in seconds.
QUICK_LLAMA = dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=4096,
                   max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)


def sync(device: torch.device) -> None:
    """Wait for the work queued on the device (CUDA runs asynchronously; the CPU has finished already)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: str = "cuda", nbytes: int = 4 << 30, dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes/s of a reduction over an nbytes tensor (the roofline's bandwidth), best of 10."""
    dev = torch.device(device)
    x = torch.empty(nbytes // dtype.itemsize, dtype=dtype, device=dev).normal_()
    best = float("inf")
    for _ in range(10):
        sync(dev)
        t = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync(dev)
        best = min(best, time.perf_counter() - t)
    del x
    return nbytes / best


def matmul_peak(device: str = "cuda", n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    dev = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(3):
        a @ b
    sync(dev)
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(dev)
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


def fill_decode_batch(engine, batch: int, ctx: int, steps: int) -> None:
    """Add `batch` requests of `ctx` random tokens and prefill them all; each may then decode `steps` more
    tokens (and a few for warm-up) before it finishes."""
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


def abort_all(engine) -> None:
    for rid in list(engine.scheduler.requests):
        engine.abort_request(rid)


def decode_step_time(engine, batch: int, ctx: int, steps: int) -> float:
    fill_decode_batch(engine, batch, ctx, steps)
    for _ in range(3):
        engine.step()
    sync(engine.device)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()  # each step ends with the host reading the sampled tokens
    elapsed = (time.perf_counter() - t) / steps
    if len(engine.scheduler.running) != batch:  # preempted for want of KV blocks: not a batch-`batch` step
        raise RuntimeError(f"only {len(engine.scheduler.running)} of {batch} requests ran at context {ctx} "
                           f"({len(engine.scheduler.requests)} unfinished): the KV pool may be too small for this "
                           "batch (more --kv-gib)")
    abort_all(engine)
    return elapsed


def prefill_time(engine, length: int) -> float:
    from engine.sampling_params import SamplingParams

    best = float("inf")
    for rep in range(3):
        prompt = _prompts(1, length, engine.model_config.vocab_size)[0]
        prompt[0] = 100 + rep  # a different first block each time: no prefix-cache hit
        sync(engine.device)
        t = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
        best = min(best, time.perf_counter() - t)
    return best


def hf_decode_step_time(folder: Path, batch: int, ctx: int, steps: int, device: str = "cuda",
                        dtype: torch.dtype = torch.bfloat16) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = torch.device(device)
    config = AutoConfig.from_pretrained(folder)
    with dev:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.tensor(_prompts(batch, ctx, config.vocab_size), device=dev)

    def run(n: int, m=model) -> float:
        sync(dev)
        t = time.perf_counter()
        with torch.no_grad():
            m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, cache_implementation="static", pad_token_id=0)
        sync(dev)
        return time.perf_counter() - t

    run(2)
    result = (run(steps + 1) - run(1)) / steps
    del model, run
    gc.collect()
    if dev.type == "cuda":
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
                # Replays a second of those layers' linears, so the ratio is the Triton kernels' speedup.
                emit(bench, f"gemv_{role}_replays_per_s_batch{bs}", 1e6 / r["best_us"], "1/s",
                     "norm/activation kernel + cuBLAS", 1e6 / r["unfused_us"], triton_us=r["best_us"],
                     unfused_us=r["unfused_us"], tile=r["tile"], chosen=r["chosen"], batch=bs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the same measurements on the CPU, a small Llama")
    ap.add_argument("--batches", default=None, help="default 1,8,64,256 (--quick: 1,8)")
    ap.add_argument("--ctx", type=int, default=None, help="default 1024 (--quick: 128)")
    ap.add_argument("--steps", type=int, default=None, help="default 30 (--quick: 5)")
    ap.add_argument("--prefill", default=None, help="default 512,2048,8192 (--quick: 128,512)")
    ap.add_argument("--no-hf", action="store_true")
    args, _ = ap.parse_known_args()
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    if args.quick:
        device, dtype, shapes_cfg, kv_bytes = "cpu", torch.float32, QUICK_LLAMA, 64 << 20
        bw, peak = read_bandwidth("cpu", 256 << 20, torch.float32), matmul_peak("cpu", 1024, torch.float32)
        defaults = ("1,8", 128, 5, "128,512")
        model_name, limits = "small llama (4 layers, hidden 256, random)", ("256 MiB float32", "1024^3 float32")
    else:
        device, dtype, shapes_cfg, kv_bytes = "cuda", torch.bfloat16, LLAMA3_8B, 36 << 30
        bw, peak = read_bandwidth(), matmul_peak()
        defaults = ("1,8,64,256", 1024, 30, "512,2048,8192")
        model_name, limits = "llama3-8b-shapes (random)", ("4 GiB bf16", "8192^3 bf16")
    batches = [int(b) for b in (args.batches or defaults[0]).split(",")]
    ctx, steps = args.ctx or defaults[1], args.steps or defaults[2]
    prefill_lengths = [int(x) for x in (args.prefill or defaults[3]).split(",")]
    emit("engine_gpu", "read_bandwidth", bw / 1e12, "TB/s", note=f"{limits[0]} reduction")
    emit("engine_gpu", "matmul_peak", peak / 1e12, "TFLOP/s", note=f"{limits[1]} matmul")
    folder = config_folder(shapes_cfg)
    engine = LLMEngine(EngineConfig(model=str(folder), load_format="dummy", device=device,
                                    dtype=str(dtype).removeprefix("torch."), kv_cache_bytes=kv_bytes,
                                    max_num_seqs=max(batches), max_num_batched_tokens=8192,
                                    enable_prefix_caching=False, attention_backend="torch" if args.quick else "auto"))
    cfg = engine.model_config
    shapes = {"model": model_name, "dtype": str(dtype).removeprefix("torch."), "ctx": ctx}
    emit_gemv_report("engine_gpu", engine)
    for b in batches:
        step = decode_step_time(engine, b, ctx, steps)
        roofline = decode_roofline_s(engine, b, ctx, bw)
        graphs = engine.runner.graphs
        bs = next(s for s in graphs.sizes if s >= b) if graphs is not None else None
        emit("engine_gpu", f"decode_step_ms_batch{b}", step * 1e3, "ms", "memory roofline", roofline * 1e3,
             ratio=roofline / step, hardware_limit=True, batch=b, blas=graphs and graphs.blas.get(bs),
             blas_replay_ms=graphs and graphs.blas_ms.get(bs), **shapes)
    # 2 FLOPs a weight; dense: all are used
    flops_per_token = 2 * touched_weight_bytes(engine, 1) / dtype.itemsize
    for length in prefill_lengths:
        t = prefill_time(engine, length)
        attn_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length * length / 2
        achieved = (flops_per_token * length + attn_flops) / t
        emit("engine_gpu", f"prefill_tokens_per_s_{length}", length / t, "tok/s", "matmul peak (MFU)",
             peak / 1e12, ratio=achieved / peak, hardware_limit=True, achieved_tflops=achieved / 1e12, **shapes)
    ours = {b: decode_step_time(engine, b, ctx, steps) for b in (1, 8)}
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if not args.no_hf:
        for b in (1, 8):
            hf = hf_decode_step_time(folder, b, ctx, steps, device, dtype)
            # Tokens a second, so the ratio is our speedup over transformers.
            emit("engine_gpu", f"decode_tokens_per_s_vs_transformers_batch{b}", b / ours[b], "tok/s",
                 "transformers.generate static cache", b / hf, ours_ms=ours[b] * 1e3, transformers_ms=hf * 1e3,
                 batch=b, **shapes)


if __name__ == "__main__":
    main()
