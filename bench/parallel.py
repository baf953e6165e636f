"""Parallel decoding benchmark (GPU; JSON lines).

One GPU (default):
- the MoE layer's grouped expert kernel against a dense SwiGLU matmul of the same FLOPs (Qwen3-MoE-30B-A3B
  shapes: 128 experts, top-8, hidden 2048, expert intermediate 768), tokens 1 .. 8k, bf16;
- decode step time with TP=1 of a random Qwen3-MoE-30B-A3B-shaped model against the memory roofline of the
  weights its batch touches (attention + the experts its tokens pick) plus KV, read bandwidth measured here.

Several GPUs (--tp/--ep lists, one process a rank, NCCL): decode step time of Llama-3-8B shapes for each
TP size and of the MoE for each EP size, against TP=1 and against the roofline of the GPUs used.

Run: python -m bench.parallel [--tp 1,2,4] [--ep 2,4] [--batches 1,8,64]

The MoE layer's line is GFLOP/s against the dense matmul's on the same FLOPs (ratio: the grouped kernel's
speedup); decode lines are held against the memory roofline (hardware_limit: true).

--quick: both modes on the CPU with small shapes (float32, PyTorch attention): the MoE layer of a 16-expert
top-2 model at 1, 16 and 256 tokens, its TP=1 decode, then ranks as processes over gloo instead of NCCL: a
4-layer Llama at TP 1 and 2 and the MoE at EP 2. On one CPU the ranks share the memory bandwidth, so the
roofline of "the GPUs used" is optimistic there; --quick exercises the code, the numbers count on GPUs.
"""

import argparse
import json
import os
import sys
import time

import torch

from bench.common import emit
from bench.engine_gpu import (
    LLAMA3_8B,
    QUICK_LLAMA,
    config_folder,
    decode_roofline_s,
    decode_step_time,
    read_bandwidth,
    sync,
)

QWEN3_MOE_30B = dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                     max_position_embeddings=16384, rope_theta=1000000.0, tie_word_embeddings=False,
                     rms_norm_eps=1e-6)
QUICK_MOE = dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                 num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=4096,
                 max_position_embeddings=2048, rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)


def _setup(quick: bool) -> tuple[torch.device, torch.dtype, dict, dict]:
    """(device, dtype, dense shapes, MoE shapes) of a run: the GPU's, or --quick's on the CPU."""
    if quick:
        return torch.device("cpu"), torch.float32, QUICK_LLAMA, QUICK_MOE
    return torch.device("cuda"), torch.bfloat16, LLAMA3_8B, QWEN3_MOE_30B


def _timed(fn, device: torch.device, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def moe_kernel(tokens: list[int], bw: float, shapes: dict = QWEN3_MOE_30B, device: torch.device | None = None,
               dtype: torch.dtype = torch.bfloat16) -> None:
    from engine.model_config import ModelConfig
    from engine.moe import SparseMoE, looped_swiglu
    from engine.parallel import SINGLE

    device = device or torch.device("cuda")
    cfg = ModelConfig.from_hf_dict(shapes)
    with device:
        moe = SparseMoE(cfg, SINGLE).to(dtype)
        for p in moe.parameters():
            p.data.normal_(0, 0.02)
        h, i, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        w13, w2 = torch.randn(2 * i, h, dtype=dtype) * 0.02, torch.randn(h, i, dtype=dtype) * 0.02
    expert_bytes = 3 * h * i * dtype.itemsize
    for t in tokens:
        x = torch.randn(t, h, dtype=dtype, device=device)
        rows = x.repeat_interleave(k, 0)

        def dense(rows=rows) -> torch.Tensor:  # one SwiGLU over all t*k rows: the same FLOPs, one weight
            gate, up = torch.nn.functional.linear(rows, w13).chunk(2, dim=-1)
            return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2)

        with torch.inference_mode():
            t_moe = _timed(lambda x=x: moe(x), device)
            t_dense = _timed(dense, device)
            touched = torch.topk(moe.gate(x).float(), k, dim=-1).indices.unique().numel()
            ref = moe.expert_kernel
            moe.expert_kernel = looped_swiglu
            t_loop = _timed(lambda x=x: moe(x), device, reps=5)
            moe.expert_kernel = ref
        flops = t * k * 6 * h * i
        roofline = touched * expert_bytes / bw
        # TFLOP/s on the same FLOPs: the ratio is the grouped kernel's speedup over the dense matmul.
        emit("parallel", f"moe_layer_gflops_tokens{t}", flops / t_moe / 1e9, "GFLOP/s",
             "dense SwiGLU matmul, same FLOPs", flops / t_dense / 1e9, moe_us=t_moe * 1e6, dense_us=t_dense * 1e6,
             experts_touched=touched, memory_roofline_us=roofline * 1e6, roofline_ratio=roofline / t_moe,
             python_loop_over_experts_us=t_loop * 1e6, speedup_vs_loop=t_loop / t_moe,
             shapes=f"{shapes['model_type']} layer ({cfg.num_experts} experts, top-{k})",
             dtype=str(dtype).removeprefix("torch."))


def _engine(shapes: dict, batches: list[int], parallel=None, kv_bytes: int = 16 << 30, attention: str = "auto",
            ep_cuda_graphs: bool = True, device: str = "auto", dtype: str = "bfloat16"):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.parallel import SINGLE

    return LLMEngine(EngineConfig(model=str(config_folder(shapes)), load_format="dummy", device=device, dtype=dtype,
                                  kv_cache_bytes=kv_bytes, max_num_seqs=max(batches), max_num_batched_tokens=8192,
                                  enable_prefix_caching=False, attention_backend=attention,
                                  ep_cuda_graphs=ep_cuda_graphs),
                     parallel=parallel or SINGLE)


def decode_rows(engine, batches: list[int], ctx: int, steps: int, bw: float, ranks: int, label: str,
                baseline: dict[int, float] | None = None) -> dict[int, float]:
    out = {}
    for b in batches:
        step = decode_step_time(engine, b, ctx, steps)
        # Every rank reads its shard at the same time: the group's bandwidth is ranks x one GPU's.
        roofline = decode_roofline_s(engine, b, ctx, bw)
        extra = {} if baseline is None else {"speedup_vs_1_rank": baseline[b] / step}
        emit("parallel", f"decode_step_ms_{label}_batch{b}", step * 1e3, "ms", "memory roofline of the GPUs used",
             roofline * 1e3, ratio=roofline / step, hardware_limit=True, batch=b, ctx=ctx, ranks=ranks, **extra)
        out[b] = step
    return out


def _rank_main(rank: int, world: int, tp: int, ep: int, shapes: dict, args, port: int, results) -> None:
    import faulthandler

    from engine.parallel import ParallelConfig, init_parallel

    # A size that hangs is killed at --run-timeout-s: each rank prints where it is stuck a little before that.
    faulthandler.dump_traceback_later(max(1.0, args.run_timeout_s - 15), exit=False)
    if args.quick:  # gloo between CPU processes
        device, dtype, kv_bytes = torch.device("cpu"), "float32", 64 << 20
        torch.set_num_threads(1)  # one core a rank
    else:
        torch.cuda.set_device(rank)
        device, dtype, kv_bytes = torch.device("cuda", rank), "bfloat16", args.kv_gib << 30
    par = init_parallel(ParallelConfig(tp, ep), rank, f"tcp://127.0.0.1:{port}", device)
    batches = [int(b) for b in args.batches.split(",")]
    engine = _engine(shapes, batches, par, kv_bytes=kv_bytes, attention=args.attention,
                     ep_cuda_graphs=not args.ep_eager, device=device.type, dtype=dtype)
    if rank == 0:
        bw = read_bandwidth("cpu", 256 << 20, torch.float32) if args.quick else read_bandwidth()
        graphs = "_eager" if args.ep_eager and ep > 1 else ""
        label = f"{shapes['model_type']}{shapes['num_hidden_layers']}l_tp{tp}_ep{ep}_{args.attention}{graphs}"
        base = results.get("base")
        times = decode_rows(engine, batches, args.ctx, args.steps, bw, world, label,
                            None if base is None or world == 1 else base)
        results.update(times=times)
        if args.profile:
            profile_steps(engine, batches[0], args.ctx, label)
        engine.runner.stop_followers()
    else:
        engine.runner.follow()
    # Not destroy_process_group: a rank could hang in it (seen with TP=2 after its rows were out) while the
    # others had left; the process ends here and the driver only reads `results`.
    sys.stdout.flush()
    os._exit(0)


def profile_steps(engine, batch: int, ctx: int, label: str, steps: int = 5) -> None:
    """Where a decode step's time goes on rank 0: the top operators by device time and by host time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode_step_time(engine, batch, ctx, steps)
    table = prof.key_averages()
    print(f"--- profile {label} batch {batch}: {steps} timed steps (plus prefill and warm-up) ---", flush=True)
    print(table.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)
    print(table.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60), flush=True)


def multi_gpu(args) -> None:
    import torch.multiprocessing as mp

    from pdserve_cli.main import free_port

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on the lent machines
    _, _, dense, moe = _setup(args.quick)
    layers = {"num_hidden_layers": args.layers} if args.layers else {}
    runs = [(dense | layers, int(t), 1) for t in args.tp.split(",") if t] + \
           [(moe | layers, 1, int(e)) for e in args.ep.split(",") if e]
    base: dict[str, dict[int, float]] = {}
    for shapes, tp, ep in runs:
        world = tp * ep
        if not args.quick and world > torch.cuda.device_count():
            print(json.dumps({"skipped": f"{shapes['model_type']} tp{tp} ep{ep}: {world} GPUs needed"}), flush=True)
            continue
        with mp.Manager() as manager:
            results = manager.dict()
            if shapes["model_type"] in base:
                results["base"] = base[shapes["model_type"]]
            ctx = mp.start_processes(_rank_main, args=(world, tp, ep, shapes, args, free_port(), results),
                                     nprocs=world, start_method="spawn", join=False)
            deadline = time.monotonic() + args.run_timeout_s
            name = f"{shapes['model_type']} tp{tp} ep{ep}"
            try:
                while not ctx.join(timeout=5):  # one run that hangs (e.g. in NCCL's set-up) must not eat the others
                    if time.monotonic() > deadline:
                        for proc in ctx.processes:
                            proc.kill()
                        print(json.dumps({"skipped": f"{name}: no result in {args.run_timeout_s:g} s",
                                          "got": dict(results)}), flush=True)
                        break
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # nor one that fails (an exception, or a rank that exited)
                for proc in ctx.processes:
                    proc.kill()
                print(json.dumps({"failed": f"{name}: {str(e).strip().splitlines()[-1]}", "got": dict(results)}),
                      flush=True)
            if world == 1 and "times" in results:
                base[shapes["model_type"]] = dict(results["times"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="on the CPU, small shapes: the one-device part, then TP 1,2 and EP 2 over gloo")
    ap.add_argument("--tokens", default="1,16,256,2048,8192", help="MoE layer sizes")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kv-gib", type=int, default=20, help="KV pool a rank (batch 64 x 1k tokens of Llama-3-8B: 8.6 GB)")
    ap.add_argument("--tp", default="", help="e.g. 1,2,4: multi-GPU decode of Llama-3-8B shapes per TP size")
    ap.add_argument("--ep", default="", help="e.g. 2,4: multi-GPU decode of the MoE per EP size (with --tp 1 first)")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--run-timeout-s", type=float, default=240.0, help="per TP/EP size: stop its ranks after this")
    ap.add_argument("--ep-eager", action="store_true", help="expert-parallel decode without CUDA graphs "
                    "(EngineConfig.ep_cuda_graphs off)")
    ap.add_argument("--profile", action="store_true", help="rank 0 profiles decode steps of the first batch size")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the real model (faster runs)")
    ap.add_argument("--attention", default="auto", choices=["auto", "torch", "flashinfer"],
                    help="torch: no FlashInfer JIT and no CUDA graphs (eager steps)")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.batches, args.ctx, args.steps, args.attention = "1,16,256", "1,8", 128, 5, "torch"
        one_device(args)
        args.tp, args.ep = "1,2", "2"
        multi_gpu(args)
        return
    if args.tp or args.ep:
        multi_gpu(args)
        return
    one_device(args)


def one_device(args) -> None:
    device, dtype, _, moe = _setup(args.quick)
    if args.quick:
        bw = read_bandwidth("cpu", 256 << 20, torch.float32)
        emit("parallel", "read_bandwidth", bw / 1e12, "TB/s", note="256 MiB float32 reduction (CPU)")
    else:
        bw = read_bandwidth()
        emit("parallel", "read_bandwidth", bw / 1e12, "TB/s", note="4 GiB bf16 reduction")
    if not args.skip_kernel:
        moe_kernel([int(t) for t in args.tokens.split(",")], bw, moe, device, dtype)
    batches = [int(b) for b in args.batches.split(",")]
    engine = _engine(moe, batches, kv_bytes=(64 << 20) if args.quick else args.kv_gib << 30,
                     attention=args.attention, device=device.type, dtype=str(dtype).removeprefix("torch."))
    decode_rows(engine, batches, args.ctx, args.steps, bw, 1, f"{moe['model_type']}_tp1_ep1")


if __name__ == "__main__":
    main()
