"""Cross-check the harness against NVIDIA's aiperf on the same mock endpoint (known TTFT/ITL): TTFT, ITL and
throughput should agree within 10%. Not run in CI (aiperf is a large install).

  python -m bench.crosscheck_aiperf --aiperf /path/to/aiperf --tokenizer DIR
"""

import argparse
import asyncio
import json
import subprocess
import tempfile
from pathlib import Path

from bench.common import emit
from bench.loadgen import run_workload, summarize
from bench.mock_server import start_in_thread
from bench.workloads import fixed


def _aiperf_metric(export: dict, name: str, stat: str) -> float:
    for key, value in export.items():
        if key == name and isinstance(value, dict):
            return float(value[stat])
    raise KeyError(f"{name}.{stat} not in aiperf's export: {sorted(export)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--aiperf", default="aiperf")
    ap.add_argument("--tokenizer", required=True, help="a local tokenizer folder (aiperf cannot download)")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--ttft", type=float, default=0.1)
    ap.add_argument("--itl", type=float, default=0.02)
    ap.add_argument("--output-len", type=int, default=32)
    a = ap.parse_args()
    _, port = start_in_thread(a.ttft, a.itl)
    url = f"http://127.0.0.1:{port}"
    results, wall = asyncio.run(run_workload(url, "mock", fixed(a.requests, 64, a.output_len, seed=0), a.rate))
    ours = summarize(results, wall)
    out = Path(tempfile.mkdtemp(prefix="aiperf-"))
    subprocess.run([a.aiperf, "profile", "-m", "mock", "--url", f"127.0.0.1:{port}", "--endpoint-type",
                    "completions", "--streaming", "--tokenizer", a.tokenizer, "--random-seed", "0",
                    "--synthetic-input-tokens-mean", "64", "--synthetic-input-tokens-stddev", "0",
                    "--output-tokens-mean", str(a.output_len), "--output-tokens-stddev", "0",
                    "--request-count", str(a.requests), "--request-rate", str(a.rate), "--artifact-dir", str(out)],
                   check=True)
    export = json.loads(next(out.rglob("profile_export_aiperf.json")).read_text())
    pairs = [("ttft_p50_ms", ours["ttft_p50_ms"], _aiperf_metric(export, "time_to_first_token", "p50"), "ms"),
             ("itl_p50_ms", ours["itl_p50_ms"], _aiperf_metric(export, "inter_token_latency", "p50"), "ms"),
             ("output_tok_per_s", ours["output_tok_per_s"],
              _aiperf_metric(export, "output_token_throughput", "avg"), "tok/s")]
    for metric, mine, theirs, unit in pairs:
        emit("crosscheck_aiperf", metric, mine, unit, "aiperf", theirs, requests=a.requests, rate=a.rate,
             true_ttft_ms=a.ttft * 1e3, true_itl_ms=a.itl * 1e3)


if __name__ == "__main__":
    main()
