"""What a router adds: latency (p50/p99, non-streaming and streaming) and the highest request rate one
router process sustains, with cheap mock workers on loopback, against going to the mocks directly and
against the peers (sglang-router, vllm-router) on the same mocks, in one run. An added latency's ratio is
its share of the direct latency (value / baseline_value: the latency through the router over the direct one,
minus one). The peers are optional: without them --quick measures pdserve's router alone.

  python -m bench.router_overhead [--quick] [--sglang-python PY] [--vllm-router BIN]
"""

import argparse
import asyncio
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.cluster import ROOT, free_port, wait_http
from bench.common import emit
from bench.raw_http import ConnectionPool

WORDS = ["the", "a", "router", "routes", "requests", "to", "workers", "with", "caches", "and", "load", "under", "many", "tenants", "every", "day"]


def _prompt(rng: random.Random, chars: int) -> str:
    words, size = [], 0
    while size < chars:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)


def _body(rng: random.Random, stream: bool, max_tokens: int, prompt_chars: int) -> dict:
    return {"model": "mock", "max_tokens": max_tokens, "stream": stream, "temperature": 0,
            "messages": [{"role": "user", "content": _prompt(rng, prompt_chars)}]}


async def _open_loop(port: int, rate: float, duration_s: float, stream: bool, max_tokens: int,
                     prompt_chars: int, warmup_s: float = 0.5) -> list:
    """Requests sent at a fixed rate, each when its time comes; those of the first `warmup_s` are not counted
    (the connections they open are reused later, as a real client's are)."""
    pool = ConnectionPool("127.0.0.1", port, 256)
    rng = random.Random(2 if stream else 0)  # the streamed prompts are not the plain ones (the router caches)
    warm = int(rate * warmup_s)
    n = warm + int(rate * duration_s)
    bodies = [_body(rng, stream, max_tokens, prompt_chars) for _ in range(n)]  # made before the clock starts
    tasks = []
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(pool.post_json("/v1/chat/completions", bodies[i])))
    done = await asyncio.gather(*tasks, return_exceptions=True)
    pool.close()
    return [r for r in done[warm:] if not isinstance(r, BaseException) and r.status == 200]


async def _closed_loop(port: int, concurrency: int, duration_s: float, prompt_chars: int) -> float:
    pool = ConnectionPool("127.0.0.1", port, concurrency)
    rng = random.Random(1)
    # Distinct ~1.6 KB prompts, more than the router's cache of prompt parts holds (4 MiB of text), cycled:
    # every request is tokenized (a cache hit would measure the cache, not "tokenizing included").
    bodies = [_body(rng, False, 1, prompt_chars) for _ in range(4096)]
    done = 0
    deadline = time.perf_counter() + duration_s

    async def worker(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < deadline:
            r = await pool.post_json("/v1/chat/completions", bodies[i % len(bodies)])
            done += r.status == 200
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.perf_counter() - start)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def _measure(port: int, a: argparse.Namespace) -> dict:
    plain = asyncio.run(_open_loop(port, a.rate, a.duration, False, 1, a.prompt_chars))
    lat = [r.end - r.start for r in plain]
    streamed = asyncio.run(_open_loop(port, a.stream_rate, a.duration, True, a.stream_tokens, a.prompt_chars))
    first = [r.chunk_times[0] - r.start for r in streamed if r.chunk_times]
    gaps = [b - c for r in streamed for c, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    rps = asyncio.run(_closed_loop(port, a.concurrency, a.duration, a.prompt_chars))
    return {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "first_p50": _pct(first, 50), "first_p99": _pct(first, 99),
            "gap_p50": _pct(gaps, 50), "rps": rps, "ok": len(plain), "ok_stream": len(streamed)}


def _start(cmd: list[str], health: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    wait_http(health, timeout_s=60, proc=proc)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--stream-rate", type=float, default=50.0)
    ap.add_argument("--stream-tokens", type=int, default=8)
    ap.add_argument("--itl", type=float, default=0.005, help="mock inter-token gap for streamed responses")
    # A p99 needs the samples: over 5 s (1,000 requests at 200/s) the added p99 swung 0.8-3.2 ms on the GPU host,
    # over 20 s (4,000) it read 1.18 and 1.28 ms.
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of each phase (20: a p99 of 4,000)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--prompt-chars", type=int, default=1600)
    ap.add_argument("--tokenizer-dir", default=None, help="tokenizer for the mocks (default: the demo model's)")
    ap.add_argument("--sglang-python", default=None, help="a python with sglang-router installed")
    ap.add_argument("--vllm-router", default=None, help="the vllm-router binary")
    ap.add_argument("--router-args", default="", help="more flags for pdserve's router, e.g. '--tokenize-parallel off'")
    a = ap.parse_args()
    if a.quick:
        a.duration, a.rate, a.stream_rate = 2.0, 100.0, 25.0
    tok = a.tokenizer_dir or str(_demo_tokenizer())
    procs = []
    try:
        mock_ports = [free_port() for _ in range(a.workers)]
        for p in mock_ports:
            procs.append(_start([sys.executable, "-m", "bench.mock_server", "--port", str(p), "--ttft", "0",
                                 "--itl", str(a.itl), "--tokenizer-dir", tok], f"http://127.0.0.1:{p}/health"))
        urls = [f"http://127.0.0.1:{p}" for p in mock_ports]
        targets = {"direct": mock_ports[0]}
        port = free_port()
        args = [sys.executable, "-m", "router.main", "--port", str(port), "--policy", "cache_aware"]
        for u in urls:
            args += ["--decode", u]
        args += shlex.split(a.router_args)
        procs.append(_start(args, f"http://127.0.0.1:{port}/health"))
        targets["pdserve"] = port
        if a.sglang_python:
            port = free_port()
            procs.append(_start([a.sglang_python, "-m", "sglang_router.launch_router", "--worker-urls", *urls,
                                 "--policy", "cache_aware", "--port", str(port), "--log-level", "warn",
                                 "--prometheus-port", str(free_port())],
                                f"http://127.0.0.1:{port}/health"))
            targets["sglang-router"] = port
        if a.vllm_router:
            port = free_port()
            procs.append(_start([a.vllm_router, "--worker-urls", *urls, "--policy", "cache_aware", "--port",
                                 str(port), "--prometheus-port", str(free_port())], f"http://127.0.0.1:{port}/health"))
            targets["vllm-router"] = port
        results = {name: _measure(port, a) for name, port in targets.items()}
        d = results["direct"]
        common = {"workers": a.workers, "prompt_chars": a.prompt_chars, "rate": a.rate, "policy": "cache_aware"}
        for name, r in results.items():
            if name == "direct":
                continue
            # Added latency over the direct latency: ratio 0.1 is a router adding a tenth of the direct time.
            emit("router_overhead", f"{name}_added_p50_ms", r["p50"] - d["p50"], "ms", "direct to the mock", d["p50"],
                 **common)
            emit("router_overhead", f"{name}_added_p99_ms", r["p99"] - d["p99"], "ms", "direct to the mock", d["p99"],
                 **common)
            emit("router_overhead", f"{name}_stream_first_chunk_added_p50_ms", r["first_p50"] - d["first_p50"], "ms",
                 "direct to the mock", d["first_p50"], stream_rate=a.stream_rate, **common)
            emit("router_overhead", f"{name}_stream_chunk_gap_p50_ms", r["gap_p50"], "ms", "direct to the mock",
                 d["gap_p50"], **common)
            emit("router_overhead", f"{name}_max_req_per_s", r["rps"], "req/s", "direct to the mock", d["rps"],
                 concurrency=a.concurrency, **common)
        if "sglang-router" in results:
            s, p = results["sglang-router"], results["pdserve"]
            emit("router_overhead", "pdserve_vs_sglang_max_req_per_s", p["rps"], "req/s", "sglang-router", s["rps"],
                 **common)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def _demo_tokenizer() -> Path:
    from engine.tokenizer_files import tokenizer_dir
    from pdserve_cli.main import demo_model

    return tokenizer_dir(demo_model())


if __name__ == "__main__":
    main()
