"""Cross-check the harness (bench.loadgen over bench.raw_http) against another client on the same mock endpoint
with known delays, in the same run: TTFT p50, ITL p50 and output throughput should agree within 10%, and both
sit near the mock's true delays (carried in each line).

  python -m bench.crosscheck_aiperf --aiperf /path/to/aiperf --tokenizer DIR       (NVIDIA's aiperf)
  python -m bench.crosscheck_aiperf --quick                                        (httpx, in this process)

The reference client is NVIDIA's aiperf by default (`pip install aiperf` into a venv of its own: it pins
versions of its own; aiperf 0.13 runs on the 2-core CPU VM too, given a local tokenizer folder). --quick (and
--reference httpx) uses a second, independent client instead: httpx streaming, its own SSE parsing, the same
requests at the same arrival times, so CI checks the harness's parsing and timing without aiperf. Both sides
send at a constant rate (aiperf's --arrival-pattern constant), so throughput compares like with like.
"""

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.common import emit
from bench.loadgen import arrivals, run_workload, summarize
from bench.run import start_mock, stop
from bench.workloads import fixed


def _aiperf_metric(export: dict, name: str, stat: str) -> float:
    for key, value in export.items():
        if key == name and isinstance(value, dict):
            return float(value[stat])
    raise KeyError(f"{name}.{stat} not in aiperf's export: {sorted(export)}")


def aiperf_figures(a: argparse.Namespace, url: str) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix="aiperf-"))
    subprocess.run([a.aiperf, "profile", "-m", "mock", "--url", url, "--endpoint-type", "completions",
                    "--streaming", "--tokenizer", a.tokenizer, "--random-seed", "0",
                    "--synthetic-input-tokens-mean", str(a.input_len), "--synthetic-input-tokens-stddev", "0",
                    "--output-tokens-mean", str(a.output_len), "--output-tokens-stddev", "0",
                    "--extra-inputs", "ignore_eos:true", "--request-count", str(a.requests),
                    "--request-rate", str(a.rate), "--arrival-pattern", "constant", "--artifact-dir", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    export = json.loads(next(out.rglob("profile_export_aiperf.json")).read_text())
    return {"ttft_p50_ms": _aiperf_metric(export, "time_to_first_token", "p50"),
            "itl_p50_ms": _aiperf_metric(export, "inter_token_latency", "p50"),
            "output_tok_per_s": _aiperf_metric(export, "output_token_throughput", "avg")}


async def httpx_figures(a: argparse.Namespace, url: str, work: list[dict]) -> dict[str, float]:
    """The same requests at the same offsets through httpx: time to the first content event, gaps between
    events, output tokens from `usage` over the wall time."""
    offsets = arrivals(len(work), a.rate, "constant", 0)
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens = 0

    async def one(client: httpx.AsyncClient, t0: float, offset: float, session: dict) -> None:
        nonlocal tokens
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        body = {"model": "mock", "prompt": session["prompt"], "max_tokens": session["max_tokens"],
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        start = last = time.perf_counter()
        first = True
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens += chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                (ttfts.append(now - start) if first else gaps.append(now - last))
                first, last = False, now

    limits = httpx.Limits(max_connections=len(work), max_keepalive_connections=len(work))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, t0, o, s) for o, s in zip(offsets, work, strict=True)))
        wall = time.perf_counter() - t0
    return {"ttft_p50_ms": float(np.percentile(ttfts, 50)) * 1e3, "itl_p50_ms": float(np.percentile(gaps, 50)) * 1e3,
            "output_tok_per_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="httpx as the reference client, 30 requests")
    ap.add_argument("--reference", choices=["aiperf", "httpx"], default=None,
                    help="the client the harness is checked against (default: aiperf; --quick: httpx)")
    ap.add_argument("--aiperf", default="aiperf")
    ap.add_argument("--tokenizer", default=None, help="a local tokenizer folder for aiperf (it cannot download)")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--ttft", type=float, default=0.1)
    ap.add_argument("--itl", type=float, default=0.02)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    a = ap.parse_args()
    reference = a.reference or ("httpx" if a.quick else "aiperf")
    if a.quick:
        a.requests, a.rate, a.ttft, a.itl, a.output_len = 30, 20.0, 0.05, 0.01, 16
    if reference == "aiperf" and not a.tokenizer:
        raise SystemExit("aiperf needs --tokenizer DIR (or --reference httpx)")
    url, proc = start_mock(a.ttft, a.itl)
    try:
        work = fixed(a.requests, a.input_len, a.output_len, seed=0)
        results, wall = asyncio.run(run_workload(url, "mock", work, a.rate, "constant"))
        ours = summarize(results, wall)
        theirs = aiperf_figures(a, url) if reference == "aiperf" else asyncio.run(httpx_figures(a, url, work))
    finally:
        stop(proc)
    units = {"ttft_p50_ms": "ms", "itl_p50_ms": "ms", "output_tok_per_s": "tok/s"}
    for metric, unit in units.items():
        emit("crosscheck_aiperf", metric, ours[metric], unit, reference, theirs[metric],
             within_10pct=abs(ours[metric] / theirs[metric] - 1) <= 0.1, requests=a.requests, rate=a.rate,
             arrival="constant", output_len=a.output_len, true_ttft_ms=a.ttft * 1e3, true_itl_ms=a.itl * 1e3)


if __name__ == "__main__":
    main()
