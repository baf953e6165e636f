"""FP8 linears (engine/fp8.py) against bf16 on the same random weights, in the same run (JSON lines).

Llama-3-8B shapes (load_format=dummy: both engines draw the same weights; the FP8 one quantizes them at load,
a scale a row). Decode step time at batch 1 and 64 (context 1024), with the step's FP8 read roofline as the
hardware limit; prefill tokens/s of an 8k prompt; and the next-token logits of both engines at the end of 16
prompts: cosine similarity and top-1 agreement; decode with FP8 weights and an FP8 KV cache (at context 1024
and batch 64 a step reads more KV than weights); the logits and the decode at the largest batch of an FP8 KV
cache alone. Issue 34's bars: decode batch 1 >= 1.7x faster (>= 80% of the
FP8 read roofline), batch 64 >= 1.5x, prefill 8k >= 1.4x; logits cosine >= 0.99.

  python -m bench.fp8            # GPU (Ada/Hopper)
  python -m bench.fp8 --quick    # CPU: a small Llama, float32 against FP8 linears through torch._scaled_mm
"""

import argparse
import gc

import torch

from bench.common import emit
from bench.engine_gpu import (
    LLAMA3_8B,
    QUICK_LLAMA,
    _prompts,
    config_folder,
    decode_roofline_s,
    decode_step_time,
    prefill_time,
    read_bandwidth,
)


def next_token_logits(engine, prompts: list[list[int]]) -> torch.Tensor:
    """[prompts, vocab] float32: the logits each prompt's prefill computes for its next token."""
    from engine.sampling_params import SamplingParams

    seen, compute = [], engine.model.compute_logits

    def keep(hidden: torch.Tensor) -> torch.Tensor:
        logits = compute(hidden)
        seen.append(logits.float().cpu())
        return logits

    engine.model.compute_logits = keep
    try:
        for p in prompts:  # one at a time: a prefill step samples that prompt's row only
            engine.generate([p], SamplingParams(max_tokens=1, temperature=0))
    finally:
        engine.model.compute_logits = compute
    return torch.cat([s[-1:] for s in seen[: len(prompts)]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU: a small Llama")
    a = ap.parse_args()
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    if a.quick:
        device, shapes, kv, batches, ctx, steps, prefill = "cpu", QUICK_LLAMA, 64 << 20, (1, 8), 128, 5, 512
        bw = read_bandwidth("cpu", 256 << 20, torch.float32)
    else:
        device, shapes, kv, batches, ctx, steps, prefill = "cuda", LLAMA3_8B, 12 << 30, (1, 64), 1024, 30, 8192
        bw = read_bandwidth()
    folder = config_folder(shapes)
    prompts = _prompts(16, 64, shapes["vocab_size"])
    results = {}
    variants = {"none": {}, "fp8": {"quantization": "fp8"}, "fp8_kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
                "kv_fp8": {"kv_cache_dtype": "fp8"}}
    for name, variant in variants.items():
        engine = LLMEngine(EngineConfig(model=str(folder), load_format="dummy", device=device, kv_cache_bytes=kv,
                                        max_num_seqs=max(batches), max_num_batched_tokens=prefill,
                                        enable_prefix_caching=False, **variant,
                                        attention_backend="torch" if a.quick else "auto"))
        r = results[name] = {"logits": next_token_logits(engine, prompts)}
        for b in batches if name != "kv_fp8" else batches[-1:]:
            r[b] = decode_step_time(engine, b, ctx, steps)
            r[f"roofline{b}"] = decode_roofline_s(engine, b, ctx, bw)
        if name in ("none", "fp8"):
            r["prefill"] = prefill_time(engine, prefill)
        del engine
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    base, ours = results["none"], results["fp8"]
    model = "small llama (random)" if a.quick else "llama3-8b-shapes (random)"
    unquantized = "float32" if a.quick else "bf16"
    for b in batches:  # tokens a second, so that the ratio is FP8's speedup
        emit("fp8", f"decode_tokens_per_s_batch{b}", b / ours[b], "tok/s", baseline=unquantized,
             baseline_value=b / base[b], step_ms=ours[b] * 1e3, baseline_step_ms=base[b] * 1e3, ctx=ctx, model=model)
        emit("fp8", f"decode_step_ms_batch{b}_vs_roofline", ours[b] * 1e3, "ms", baseline="FP8 read roofline",
             baseline_value=ours[f"roofline{b}"] * 1e3, ratio=ours[f"roofline{b}"] / ours[b], hardware_limit=True,
             read_tb_s=bw / 1e12)
    both = results["fp8_kv"]  # FP8 weights and KV: what a decode step at a long context reads halves too
    for b in batches:
        emit("fp8", f"fp8_weights_and_kv_decode_tokens_per_s_batch{b}", b / both[b], "tok/s", baseline=unquantized,
             baseline_value=b / base[b], step_ms=both[b] * 1e3, ctx=ctx)
        emit("fp8", f"fp8_weights_and_kv_decode_step_ms_batch{b}_vs_roofline", both[b] * 1e3, "ms",
             baseline="FP8 read roofline", baseline_value=both[f"roofline{b}"] * 1e3,
             ratio=both[f"roofline{b}"] / both[b], hardware_limit=True)
    emit("fp8", f"prefill_tokens_per_s_{prefill}", prefill / ours["prefill"], "tok/s", baseline=unquantized,
         baseline_value=prefill / base["prefill"], model=model)
    cos = torch.nn.functional.cosine_similarity(ours["logits"], base["logits"], dim=-1)
    top1 = (ours["logits"].argmax(-1) == base["logits"].argmax(-1)).float().mean()
    emit("fp8", "logits_cosine_min", float(cos.min()), "cosine", baseline="issue 34's bar", baseline_value=0.99,
         mean=float(cos.mean()), prompts=len(prompts))
    emit("fp8", "top1_agreement", float(top1), "share", baseline=unquantized, baseline_value=1.0)
    # The FP8 KV cache alone (weights unquantized): attention through FlashInfer over e4m3 blocks.
    kv8, b = results["kv_fp8"], batches[-1]
    emit("fp8", f"kv_fp8_decode_tokens_per_s_batch{b}", b / kv8[b], "tok/s", baseline=f"{unquantized} KV",
         baseline_value=b / base[b], ctx=ctx)
    cos = torch.nn.functional.cosine_similarity(kv8["logits"], base["logits"], dim=-1)
    emit("fp8", "kv_fp8_logits_cosine_min", float(cos.min()), "cosine", baseline=f"{unquantized} KV",
         baseline_value=1.0, top1=float((kv8["logits"].argmax(-1) == base["logits"].argmax(-1)).float().mean()))


if __name__ == "__main__":
    main()
