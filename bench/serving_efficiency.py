"""What a serving worker delivers of what its engine can: served output tokens/s through the router against
`LLMEngine.generate` on the same request set with the same max_num_seqs, in the same run (JSON lines).

For each model shape and stream count S: one decode worker (engine core + frontend processes) prefilling
locally behind R router processes, S streams in flight (closed loop, 2S requests of P prompt and O output
tokens, ignore_eos), against a child process that runs the same requests offline (fresh process: its caches
have not seen the prompts, nor has the worker: a seed each). Reported beside the ratio: ITL p50/p99, the
worker's steps/s and tokens a step, its CPU microseconds per generated token (engine core and frontend
apart), and the load generator's own CPU (cores), which must stay below what it has.

  python -m bench.serving_efficiency                       # GPU: Llama-3-8B and 1B shapes, 64 and 256 streams
  python -m bench.serving_efficiency --quick               # CPU: the demo model, 4 streams
  python -m bench.serving_efficiency --shapes tiny --streams 64   # CPU: tiny random shapes, host overhead only
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import httpx
import psutil

from bench.cluster import LocalCluster
from bench.common import emit
from bench.disagg import LLAMA_1B, dummy_model
from bench.engine_gpu import LLAMA3_8B
from bench.loadgen import _replay, summarize
from bench.workloads import fixed

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=4096, rope_theta=10000.0,
            tie_word_embeddings=False, rms_norm_eps=1e-5)
SHAPES = {"llama3-8b": LLAMA3_8B, "1b": LLAMA_1B, "tiny": TINY}


def offline(model: str, engine_args: dict, prompts: list[list[int]], output_len: int) -> dict:
    """The baseline, in this (fresh) process: LLMEngine.generate over the whole request set, after a warm-up
    on other prompts (kernels built, graphs captured, allocator warm)."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=model, **engine_args))
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    warm = [[(t * 7 + 3) % 30000 + 100 for t in p] for p in prompts[: max(2, len(prompts) // 8)]]
    engine.generate(warm, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    t0, cpu = time.perf_counter(), time.process_time()
    steps = engine.stats.num_steps
    done = engine.generate(prompts, params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
    tokens = sum(len(c.token_ids) for c in done)
    return {"tok_per_s": tokens / wall, "tokens": tokens, "wall_s": wall, "steps": engine.stats.num_steps - steps,
            "cpu_cores": cpu / wall}


def _offline_child(a: argparse.Namespace) -> None:
    spec = json.loads(Path(a.offline_child).read_text())
    print(json.dumps(offline(spec["model"], spec["engine_args"], spec["prompts"], spec["output_len"])), flush=True)


def run_offline(model: str, engine_args: dict, prompts: list[list[int]], output_len: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"model": model, "engine_args": engine_args, "prompts": prompts, "output_len": output_len}, f)
    try:
        out = subprocess.run([sys.executable, "-m", "bench.serving_efficiency", "--offline-child", f.name],
                             capture_output=True, text=True, timeout=1800, cwd=Path(__file__).resolve().parent.parent)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"the offline run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def worker_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a worker's engine core (the process started) and of its frontend (its child)."""
    core = psutil.Process(pid)
    return {"core": _cpu(core), "frontend": sum(_cpu(c) for c in core.children(recursive=True))}


def _replay_timed(*args) -> tuple[list, float, float]:
    """A load generator's replay in its own process: (results, wall, its CPU seconds during the replay)."""
    cpu = time.process_time()
    results, wall = asyncio.run(_replay(*args))
    return results, wall, time.process_time() - cpu


def serve(routers: list[str], model: str, prompts: list[list[int]], output_len: int, streams: int
          ) -> tuple[dict, float, float]:
    """The request set through the routers (one load-generator process a router, streams split among them):
    the summary, the wall time, the load generators' CPU seconds (all of them, during the replay)."""
    sessions = [{"kind": "completion", "session": f"s{i}", "prompt": p, "max_tokens": output_len}
                for i, p in enumerate(prompts)]
    n = len(routers)
    with ProcessPoolExecutor(n, mp_context=get_context("spawn")) as pool:
        list(pool.map(time.sleep, [0.5] * n))  # every process started and imported before the common start
        start_at = time.time() + 0.5
        parts = [pool.submit(_replay_timed, url, model, max(1, streams // n), None, 1800.0, start_at,
                             sessions[i::n], [0.0] * len(sessions[i::n])) for i, url in enumerate(routers)]
        done = [p.result() for p in parts]
    results = [r for part, _, _ in done for r in part]
    wall = max(r.done_at for r in results) - start_at  # from the common start to the last answer, all processes
    return summarize(results, wall), wall, sum(c for _, _, c in done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU: the demo model, 4 streams, short requests")
    ap.add_argument("--shapes", default=None, help="comma-separated: " + ", ".join(SHAPES) + " (or 'demo')")
    ap.add_argument("--streams", default=None, help="comma-separated stream counts (= max_num_seqs)")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--routers", type=int, default=None, help="router processes (one load generator each)")
    ap.add_argument("--tokenizer-dir", default=".gpu/tokenizer", help="tokenizer files for the random-weight shapes")
    ap.add_argument("--kv-gib", type=float, default=None, help="KV pool of the worker and of the offline engine")
    ap.add_argument("--offline-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.offline_child:
        _offline_child(a)
        return
    quick = a.quick
    shapes = (a.shapes or ("demo" if quick else "1b,llama3-8b")).split(",")
    streams_list = [int(s) for s in (a.streams or ("4" if quick else "64,256")).split(",")]
    prompt_len, output_len = a.prompt_len or (16 if quick else 256), a.output_len or (8 if quick else 256)
    n_routers = a.routers or (1 if quick else 4)
    on_gpu = not quick and "tiny" not in shapes and "demo" not in shapes
    tok_dir = Path(a.tokenizer_dir)
    if not on_gpu and not tok_dir.exists():
        from engine.tokenizer_files import tokenizer_dir
        from pdserve_cli.main import demo_model

        tok_dir = tokenizer_dir(demo_model())
    for shape in shapes:
        if shape == "demo":
            from pdserve_cli.main import demo_model

            model, engine_args, vocab = demo_model(), {"device": "cpu"}, 49152
        else:
            model = str(dummy_model(tok_dir, SHAPES[shape]))
            engine_args = {"load_format": "dummy", "dtype": "bfloat16" if on_gpu else "float32"}
            # Prompt ids the router's tokenizer (the demo model's, 49,152 ids) accepts, whatever the shapes' vocabulary.
            vocab = min(49152, SHAPES[shape]["vocab_size"])
        kv_bytes = int((a.kv_gib or (20 if on_gpu else 0.25)) * 2**30)
        for streams in streams_list:
            requests = 2 * streams
            # A seed each side, so that neither runs on prompts the other's prefix cache holds.
            served_prompts = [s["prompt"] for s in fixed(requests, prompt_len, output_len, seed=2 * streams, vocab=vocab)]
            offline_prompts = [s["prompt"] for s in fixed(requests, prompt_len, output_len, seed=2 * streams + 1,
                                                          vocab=vocab)]
            worker_engine = {**engine_args, "max_num_seqs": streams, "kv_cache_bytes": kv_bytes,
                             "max_num_batched_tokens": max(2048, streams)}
            base = run_offline(model, worker_engine, offline_prompts, output_len)
            flags = ["--max-num-seqs", str(streams), "--max-num-batched-tokens", str(max(2048, streams))]
            if "load_format" in engine_args:
                flags += ["--load-format", "dummy", "--dtype", engine_args["dtype"]]
            if not on_gpu:
                flags += ["--device", "cpu"]
            cluster = LocalCluster(model, prefill=0, decode=1, kv_cache_bytes=kv_bytes, worker_args=tuple(flags),
                                   start_timeout_s=900)
            try:
                routers = [cluster.start_router("--local-prefill-tokens", "1000000000") for _ in range(n_routers)]
                served_name = httpx.get(f"{routers[0]}/v1/models").json()["data"][0]["id"]
                warm = [[(t * 11 + 5) % 30000 + 100 for t in p] for p in served_prompts[: max(2, streams // 8)]]
                serve(routers, served_name, warm, 4, streams)
                url = cluster.decode_urls[0]
                cpu0, load0 = worker_cpu(cluster.worker_procs[url].pid), cluster.load(url)
                summary, wall, loadgen_cpu = serve(routers, served_name, served_prompts, output_len, streams)
                cpu1, load1 = worker_cpu(cluster.worker_procs[url].pid), cluster.load(url)
            finally:
                cluster.close()
            generated = summary["output_tok_per_s"] * wall
            steps = load1["steps"] - load0["steps"]
            emit("serving_efficiency", "served_output_tok_per_s", summary["output_tok_per_s"], "tok/s",
                 "LLMEngine.generate offline, same requests, same max_num_seqs (fresh process)", base["tok_per_s"],
                 shape=shape, streams=streams, requests=requests, prompt_len=prompt_len, output_len=output_len,
                 routers=n_routers, errors=summary["errors"], errors_by_status=summary["errors_by_status"],
                 itl_p50_ms=summary["itl_p50_ms"], itl_p99_ms=summary["itl_p99_ms"],
                 ttft_p50_ms=summary["ttft_p50_ms"], ttft_p99_ms=summary["ttft_p99_ms"], wall_s=wall,
                 offline_wall_s=base["wall_s"], offline_cpu_cores=base["cpu_cores"],
                 worker_steps_per_s=steps / wall,
                 worker_tokens_per_step=(load1["tokens_computed"] - load0["tokens_computed"]) / max(1, steps),
                 worker_steps=steps, offline_steps=base["steps"],
                 core_cpu_us_per_token=(cpu1["core"] - cpu0["core"]) / max(1, generated) * 1e6,
                 frontend_cpu_us_per_token=(cpu1["frontend"] - cpu0["frontend"]) / max(1, generated) * 1e6,
                 worker_cpu_cores=(cpu1["core"] + cpu1["frontend"] - cpu0["core"] - cpu0["frontend"]) / wall,
                 loadgen_cpu_cores=loadgen_cpu / wall, loadgen_processes=n_routers)


if __name__ == "__main__":
    main()
