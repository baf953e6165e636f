"""Disaggregated vs colocated serving on the same workers, in the same run: TTFT and ITL p50/p99.

Both paths run through one cluster (1 prefill + 1 decode worker): one router sends every prompt through the
prefill worker (disaggregated), another makes the decode worker prefill it (colocated, one process).
--quick: the demo model on CPU. Default (GPU): a random-initialised 1B-class Llama in bf16.
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
        rates, n, prompt_len, out_len, kv = [float(r) for r in (a.rates or "0.5,1").split(",")], a.requests or 6, 96, 8, 64 << 20
    else:
        model_path = str(dummy_model(Path(a.tokenizer_dir)))
        worker_args = ("--load-format", "dummy", "--dtype", "bfloat16", "--max-num-seqs", "64")
        rates, n, prompt_len, out_len, kv = [float(r) for r in (a.rates or "2,4,8").split(",")], a.requests or 48, 1024, 64, 8 << 30
    cluster = LocalCluster(model_path, prefill=1, decode=1, kv_cache_bytes=kv, worker_args=worker_args,
                           start_timeout_s=600)
    try:
        disagg = cluster.start_router("--local-prefill-tokens", "0")
        colo = cluster.start_router("--local-prefill-tokens", "1000000000")
        import httpx

        served = httpx.get(f"{disagg}/v1/models").json()["data"][0]["id"]
        warm = fixed(4, prompt_len, out_len, seed=999, vocab=49152)
        for url in (disagg, colo):
            asyncio.run(run_workload(url, served, warm, None))  # compile kernels, fill allocator caches
        for i, rate in enumerate(rates):
            stats = {}
            for name, url in (("disaggregated", disagg), ("colocated", colo)):
                work = fixed(n, prompt_len, out_len, seed=i, vocab=49152)
                results, wall = asyncio.run(run_workload(url, served, work, rate))
                stats[name] = summarize(results, wall)
            d, c = stats["disaggregated"], stats["colocated"]
            common = {"rate_req_s": rate, "requests": n, "prompt_len": prompt_len, "output_len": out_len,
                      "errors": d["errors"] + c["errors"], "model": Path(model_path).name}
            for metric in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
                if d[metric] and c[metric]:
                    # ratio < 1: the disaggregated path is faster (lower latency) than colocated.
                    emit("disagg", metric, d[metric], "ms", "colocated (same engine, one process)", c[metric],
                         ratio=d[metric] / c[metric], **common)
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
