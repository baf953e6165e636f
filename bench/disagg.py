"""Disaggregated vs colocated serving on the same workers, in the same run: TTFT and ITL p50/p99.

Both paths run through one cluster (1 prefill + 1 decode worker): one router sends every prompt through the
prefill worker (disaggregated), another makes the decode worker prefill it (colocated, one process).
--quick: the demo model on CPU. Default (GPU): a random-initialised 1B-class Llama in bf16.

Both sides start from caches that have not seen their prompts: the two paths share the decode worker (and its
prefix cache), so every (rate, side) draws its own random prompts (seed 2 x rate index + side), and the
warm-up its own (seeds 1000, 1001), random token ids that share no 16-token block with each other or with the
measured ones. Each line carries both sides' cache hit ratio (prompt tokens served from the cache), which
should be 0.
"""

import argparse
import asyncio
import json
import shutil
import tempfile
from pathlib import Path

from bench.cluster import LocalCluster
from bench.common import emit
from bench.loadgen import run_workload, summarize
from bench.workloads import fixed

LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=49152,
                max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)


def dummy_model(tokenizer_dir: Path, shapes: dict = LLAMA_1B) -> Path:
    """A folder with a config and a real tokenizer (the demo model's): weights are drawn at load
    (--load-format dummy)."""
    folder = Path(tempfile.mkdtemp(prefix="pdserve-dummy-"))
    (folder / "config.json").write_text(json.dumps(shapes))
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokenizer-dir", default=".gpu/tokenizer", help="tokenizer files for the GPU model")
    ap.add_argument("--rates", default=None, help="comma-separated request rates (req/s)")
    ap.add_argument("--requests", type=int, default=None)
    a = ap.parse_args()
    if a.quick:
        from pdserve_cli.main import demo_model

        # One CPU thread a worker: the two processes split the cores as a real deployment splits devices.
        model_path, worker_args = demo_model(), ("--max-num-seqs", "16", "--threads", "1")
        rates, n, prompt_len, out_len, kv = [float(r) for r in (a.rates or "1,2").split(",")], a.requests or 4, 64, 8, 64 << 20
    else:
        model_path = str(dummy_model(Path(a.tokenizer_dir)))
        worker_args = ("--load-format", "dummy", "--dtype", "bfloat16", "--max-num-seqs", "64")
        rates, n, prompt_len, out_len, kv = [float(r) for r in (a.rates or "8,16,32").split(",")], a.requests or 96, 1024, 64, 8 << 30
    cluster = LocalCluster(model_path, prefill=1, decode=1, kv_cache_bytes=kv, worker_args=worker_args,
                           start_timeout_s=600)
    try:
        disagg = cluster.start_router("--local-prefill-tokens", "0")
        colo = cluster.start_router("--local-prefill-tokens", "1000000000")
        import httpx

        served = httpx.get(f"{disagg}/v1/models").json()["data"][0]["id"]
        for side, url in enumerate((disagg, colo)):  # compile kernels, fill allocator caches
            warm = fixed(4, prompt_len, out_len, seed=1000 + side, vocab=49152)
            asyncio.run(run_workload(url, served, warm, None))
        for i, rate in enumerate(rates):
            stats = {}
            for side, (name, url) in enumerate((("disaggregated", disagg), ("colocated", colo))):
                work = fixed(n, prompt_len, out_len, seed=2 * i + side, vocab=49152)  # prompts no side has seen
                results, wall = asyncio.run(run_workload(url, served, work, rate))
                stats[name] = summarize(results, wall)
                stats[name]["error_sample"] = next((r.error for r in results if r.error), None)
            d, c = stats["disaggregated"], stats["colocated"]
            common = {"rate_req_s": rate, "requests": n, "prompt_len": prompt_len, "output_len": out_len,
                      "errors": d["errors"] + c["errors"], "model": Path(model_path).name,
                      "error_sample": d["error_sample"] or c["error_sample"],
                      "cache_hit_ratio": d["cache_hit_ratio"], "baseline_cache_hit_ratio": c["cache_hit_ratio"]}
            for metric in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
                if d[metric] and c[metric]:
                    # ratio < 1: the disaggregated path is faster (lower latency) than colocated.
                    emit("disagg", metric, d[metric], "ms", "colocated (same engine, one process)", c[metric],
                         **common)
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
