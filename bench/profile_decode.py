"""Where a decode step's time goes (GPU): the step as the engine runs it, the captured graph's replay alone,
the GPU kernels of one forward (by name, per step), and the host's share.

Model: random-initialised Llama-3-8B shapes in bf16, context 1k. Run: python -m bench.profile_decode

A step's line is held against the memory roofline (a hardware limit, hardware_limit: true); a --compare-X line
is steps a second with and without X, so its ratio is X's speedup.

--quick: the same on the CPU (bench.engine_gpu's small Llama, float32, PyTorch attention; batches 1 and 8 at
context 128), with --host and --compare-unfused. The CPU has no CUDA graph, so there is no replay time, and the
table of one step's operators comes from the profiler's CPU events (aten ops) instead of GPU kernels. The
other --compare flags need FlashInfer, Triton or cuBLAS and are refused with --quick.
"""

import argparse
import cProfile
import io
import pstats
import time

import torch

from bench.common import emit
from bench.engine_gpu import (
    LLAMA3_8B,
    QUICK_LLAMA,
    abort_all,
    config_folder,
    decode_roofline_s,
    decode_step_time,
    emit_gemv_report,
    fill_decode_batch,
    read_bandwidth,
)


def replay_time(graphs, bs: int, reps: int = 50) -> float:
    """Seconds per replay of the batch-bs graph, GPU-timed back to back (no host work in between)."""
    graph = graphs.graphs[bs]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def kernel_table(graphs, bs: int, top: int) -> tuple[int, float, list[tuple[str, int, float]]]:
    """(kernels a forward, their summed GPU time in s, [(name, count, seconds)] largest first) of one eager
    forward of the graph's batch (same kernels as the replay, without the graph's launch savings)."""
    from torch.profiler import ProfilerActivity, profile

    graphs.attention.plan(graphs._dummy_meta(bs), graphs.wrappers[bs])  # the graph's own batch, padding rows
    with torch.inference_mode():
        graphs._forward(bs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graphs._forward(bs)
            torch.cuda.synchronize()
    rows: dict[str, list] = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        r = rows.setdefault(e.name[:90], [0, 0.0])
        r[0] += 1
        r[1] += e.device_time / 1e6 if hasattr(e, "device_time") else e.cuda_time / 1e6
    table = sorted(((n, c, t) for n, (c, t) in rows.items()), key=lambda x: -x[2])
    return sum(c for _, c, _ in table), sum(t for _, _, t in table), table[:top]


def cpu_op_table(engine, batch: int, ctx: int, top: int) -> tuple[int, float, list[tuple[str, int, float]]]:
    """On the CPU (no graph): (operators a step, their summed self time in s, [(name, count, seconds)] largest
    first) of one decode step of `batch` requests, from the profiler's CPU events."""
    from torch.profiler import ProfilerActivity, profile

    fill_decode_batch(engine, batch, ctx, 4)
    engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    abort_all(engine)
    table = sorted(((e.key, e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()
                    if e.key.startswith("aten::")), key=lambda x: -x[2])
    return sum(c for _, c, _ in table), sum(t for _, _, t in table), table[:top]


def host_profile(engine, batch: int, ctx: int, steps: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    decode_step_time(engine, batch, ctx, steps)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    return s.getvalue()


def profile(args, fused: bool, bw: float, variant: str = "default") -> dict[int, float]:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    batches = [int(b) for b in args.batches.split(",")]
    engine = LLMEngine(EngineConfig(model=str(config_folder(QUICK_LLAMA if args.quick else LLAMA3_8B)),
                                    load_format="dummy", device="cpu" if args.quick else "auto",
                                    dtype="float32" if args.quick else "bfloat16",
                                    kv_cache_bytes=(64 << 20) if args.quick else args.kv_gib << 30,
                                    max_num_seqs=args.max_num_seqs or max(batches), enable_prefix_caching=False,
                                    fused_kernels=fused, attention_backend="torch" if args.quick else "auto"))
    graphs = engine.runner.graphs  # None on the CPU
    if variant == "default":
        emit_gemv_report("profile_decode", engine)
    steps = {}
    for b in batches:
        steps[b] = step = decode_step_time(engine, b, args.ctx, args.steps)
        roofline = decode_roofline_s(engine, b, args.ctx, bw)
        if graphs is not None:
            bs = next(s for s in graphs.sizes if s >= b)
            replay = replay_time(graphs, bs)
            n_kernels, kernel_s, table = kernel_table(graphs, bs, args.top)
            on_device = {"replay_ms": replay * 1e3, "replay_ratio": roofline / replay,
                         "host_exposed_ms": (step - replay) * 1e3, "blas": graphs.blas.get(bs),
                         "blas_replay_ms": graphs.blas_ms.get(bs)}
        else:
            n_kernels, kernel_s, table = cpu_op_table(engine, b, args.ctx, args.top)
            on_device = {"replay_ms": None, "note": "CPU: no graph; kernels are aten ops"}
        emit("profile_decode", f"step_ms_batch{b}", step * 1e3, "ms", "memory roofline", roofline * 1e3,
             ratio=roofline / step, hardware_limit=True, kernels_per_step=n_kernels, kernel_sum_ms=kernel_s * 1e3,
             batch=b, fused_kernels=fused, variant=variant, max_num_seqs=engine.config.max_num_seqs,
             kv_bytes=engine.config.kv_cache_bytes, **on_device)
        print(f"# batch {b}, fused {fused}, {variant}: {n_kernels} kernels, {kernel_s * 1e3:.2f} ms summed; top {args.top}:")
        for name, count, t in table:
            print(f"#   {t * 1e3:8.3f} ms  {count:5d}x  {name}")
    if args.host and fused and variant == "default":
        t = time.perf_counter()
        print(host_profile(engine, max(batches), args.ctx, args.steps))
        print(f"# cProfile run {time.perf_counter() - t:.1f} s")
    del engine, graphs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="on the CPU, a small Llama, --host --compare-unfused")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--kv-gib", type=int, default=20)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the largest batch (bench.engine: 256)")
    ap.add_argument("--host", action="store_true", help="also print a cProfile of the host side at the largest batch")
    ap.add_argument("--compare-unfused", action="store_true", help="also run without engine/fused.py's kernels")
    ap.add_argument("--compare-rope-store", action="store_true",
                    help="also run with FlashInfer's rotary and an indexed KV copy instead of the one Triton kernel")
    ap.add_argument("--compare-decode-kernel", action="store_true",
                    help="also run with the other FlashInfer decode kernel (tensor cores or not) than the default")
    ap.add_argument("--compare-act", action="store_true",
                    help="also run with the Triton SiLU-and-mul for batches up to 64 (fused.WIDE_ACT_MAX_TOKENS)")
    ap.add_argument("--compare-gemv", action="store_true",
                    help="also run without engine/gemv.py's Triton linears (norm and SiLU fused into them)")
    ap.add_argument("--compare-blas", action="store_true",
                    help="also run with cuBLAS for every batch size (by default each size's graph is captured "
                         "with cuBLAS and with cuBLASLt and the faster kept)")
    args = ap.parse_args()
    if args.quick:
        gpu_only = [f for f in ("compare_rope_store", "compare_decode_kernel", "compare_act", "compare_gemv",
                                "compare_blas") if getattr(args, f)]
        if gpu_only:
            raise SystemExit(f"--quick runs on the CPU; these need the GPU's kernels: {gpu_only}")
        args.batches, args.ctx, args.steps, args.top = "1,8", 128, 5, 10
        args.host = args.compare_unfused = True
        bw = read_bandwidth("cpu", 256 << 20, torch.float32)
    else:
        bw = read_bandwidth()
    base = profile(args, True, bw)
    if args.compare_unfused:
        compare(base, profile(args, False, bw, "pytorch ops"), "fused_kernels", "PyTorch ops")
    if args.compare_rope_store:
        from engine import fused

        fused.ROPE_AND_STORE = False
        compare(base, profile(args, True, bw, "rotary then KV copy"), "rope_and_store", "FlashInfer rotary + KV copy")
        fused.ROPE_AND_STORE = True
    if args.compare_decode_kernel:
        from engine.attention.flashinfer_backend import FlashInferAttention

        default = FlashInferAttention.use_tensor_cores
        FlashInferAttention.use_tensor_cores = property(lambda self: not default.fget(self))
        compare(base, profile(args, True, bw, "other decode kernel"), "default_decode_kernel",
                "the other FlashInfer decode kernel (use_tensor_cores flipped)")
        FlashInferAttention.use_tensor_cores = default
    if args.compare_act:
        from engine import fused

        fused.WIDE_ACT_MAX_TOKENS = 64
        compare(base, profile(args, True, bw, "triton silu_and_mul"), "flashinfer_act", "Triton SiLU-and-mul")
        fused.WIDE_ACT_MAX_TOKENS = 0
    if args.compare_gemv:
        from engine import gemv

        gemv.ENABLED = False
        compare(base, profile(args, True, bw, "no gemv kernels"), "gemv",
                "FlashInfer norm/activation kernels + cuBLAS (engine/gemv.py off)")
        gemv.ENABLED = True
    if args.compare_blas:
        from engine import cuda_graphs

        libraries = cuda_graphs.BLAS_LIBRARIES
        cuda_graphs.BLAS_LIBRARIES = ("cublas",)
        compare(base, profile(args, True, bw, "cublas only"), "blas_choice",
                "cuBLAS for every size (no per-size cuBLASLt choice)")
        cuda_graphs.BLAS_LIBRARIES = libraries


def compare(base: dict[int, float], other: dict[int, float], name: str, baseline: str) -> None:
    """Steps a second by default and in the other variant: the ratio is the default's speedup."""
    for b, t in base.items():
        emit("profile_decode", f"{name}_steps_per_s_batch{b}", 1 / t, "steps/s", baseline, 1 / other[b],
             default_ms=t * 1e3, baseline_ms=other[b] * 1e3, batch=b)


if __name__ == "__main__":
    main()
