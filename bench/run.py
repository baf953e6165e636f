"""One load run against any OpenAI-compatible endpoint; prints one JSON line and appends it (with the
per-request timings) to --out.

  python -m bench.run --url http://127.0.0.1:8000 --workload prefix --num 200 --rate 4 --out results.jsonl

The baseline, measured in the same run: the same sessions at the same arrival times, through the same load
generator, against a baseline endpoint. By default that is an ideal one: bench.mock_server answering at once
(--baseline-ttft 0 --baseline-itl 0, a process of its own), so the ratio is the goodput (requests a second
within both SLOs) as a share of what a server with no latency gets from this workload, these arrivals and this
load generator on this machine. --baseline-url URL holds the endpoint against another server instead (e.g. a
peer, started before), --baseline-url none leaves the ratio out. The baseline endpoint is a different server
from the one measured, so neither runs on caches the other warmed.

--quick: the endpoint measured is a mock with known delays (50 ms to the first token, 10 ms a token), 20
requests at 10 req/s; the line carries the mock's true delays beside the measured ones.
"""

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx

from bench.common import emit
from bench.loadgen import run_workload, summarize
from bench.workloads import load, make, save

QUICK_TTFT_S, QUICK_ITL_S = 0.05, 0.01


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--url", default=None, help="base URL (without /v1); required unless --quick")
    ap.add_argument("--model", default=None, help="default: the first of /v1/models")
    ap.add_argument("--workload", default="fixed",
                    help="sharegpt | sharegpt-single | prefix | long | long-3k8k | fixed | FILE.jsonl")
    ap.add_argument("--num", type=int, default=100, help="sessions to generate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000, help="token ids of random prompts stay below this")
    ap.add_argument("--arrival", default="poisson", choices=["poisson", "constant", "burst"])
    ap.add_argument("--concurrency", type=int, default=256, help="requests in flight at most (all processes)")
    ap.add_argument("--procs", type=int, default=1, help="load-generator processes (sessions split between them)")
    ap.add_argument("--warmup", type=int, default=0, help="requests left out of the figures")
    ap.add_argument("--duration", type=float, default=None, help="stop starting turns after this many seconds")
    ap.add_argument("--ttft-slo", type=float, default=1.0, help="seconds")
    ap.add_argument("--tpot-slo", type=float, default=0.05, help="seconds per output token")
    ap.add_argument("--label", default=None)
    ap.add_argument("--out", default=None, help="append the full result line here")
    ap.add_argument("--save-workload", default=None, help="write the generated workload here (replayable)")
    ap.add_argument("--baseline-url", default="mock",
                    help="mock (default): an ideal mock started here; none: no baseline; or a base URL")
    ap.add_argument("--baseline-ttft", type=float, default=0.0, help="the baseline mock's time to first token (s)")
    ap.add_argument("--baseline-itl", type=float, default=0.0, help="the baseline mock's gap between tokens (s)")
    ap.add_argument("--quick", action="store_true",
                    help="measure a mock with known delays (no --url): exercises the harness end to end")


def workload_from(a: argparse.Namespace, seed: int | None = None) -> list[dict[str, Any]]:
    if a.workload.endswith(".jsonl"):
        return load(a.workload)
    sessions = make(a.workload, a.num, a.seed if seed is None else seed, input_len=a.input_len,
                    output_len=a.output_len, vocab=a.vocab)
    if a.save_workload:
        save(sessions, a.save_workload)
    return sessions


def run_once(a: argparse.Namespace, rate: float | None, sessions: list[dict[str, Any]],
             url: str | None = None, label: str | None = None, out: str | None = None) -> dict[str, Any]:
    """One replay of `sessions` at `rate` against `url` (default a.url); appends the full result to `out`
    (default a.out). Returns the summary with the run's configuration."""
    url = url or a.url
    model = (a.model if url == a.url else None) or httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    results, wall = asyncio.run(run_workload(url, model, sessions, rate, a.arrival, a.concurrency, a.seed,
                                             a.warmup, a.duration, procs=a.procs))
    summary = summarize(results, wall, a.ttft_slo, a.tpot_slo)
    config = {"label": label or a.label or url, "workload": a.workload, "rate": rate, "arrival": a.arrival,
              "seed": a.seed, "ttft_slo_s": a.ttft_slo, "tpot_slo_s": a.tpot_slo, "model": model}
    out = a.out if out is None else out
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({**config, **summary}) + "\n")
    return {**config, **{k: v for k, v in summary.items() if k != "per_request"}}


def start_mock(ttft_s: float, itl_s: float, *extra: str) -> tuple[str, subprocess.Popen]:
    """bench.mock_server in a process of its own (not a thread here: it must not share the load generator's
    interpreter); returns its URL and process."""
    from bench.cluster import ROOT, wait_http
    from pdserve_cli.main import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.mock_server", "--port", str(port), "--ttft", str(ttft_s),
                             "--itl", str(itl_s), *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout_s=60, proc=proc)
    except BaseException:
        stop(proc)
        raise
    return url, proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def endpoints(a: argparse.Namespace, quick_target: tuple[str, ...] = ()) -> Iterator[tuple[str, str | None, str]]:
    """(URL measured, baseline URL or None, the baseline's name). --quick without --url: the URL measured is a
    mock with known delays (quick_target: more mock_server flags)."""
    procs = []
    try:
        if a.url is None:
            if not a.quick:
                raise SystemExit("--url is required (or --quick: a mock with known delays)")
            a.url, proc = start_mock(QUICK_TTFT_S, QUICK_ITL_S, *quick_target)
            a.label = a.label or "mock (known delays)"
            procs.append(proc)
        if a.baseline_url == "none":
            yield a.url, None, "none"
        elif a.baseline_url == "mock":
            url, proc = start_mock(a.baseline_ttft, a.baseline_itl)
            procs.append(proc)
            yield a.url, url, (f"ideal endpoint (mock: TTFT {a.baseline_ttft * 1e3:g} ms, ITL "
                               f"{a.baseline_itl * 1e3:g} ms), same workload and arrivals")
        else:
            yield a.url, a.baseline_url, f"{a.baseline_url}, same workload and arrivals"
    finally:
        for proc in procs:
            stop(proc)


def quick_defaults(a: argparse.Namespace, num: int, rate: float | None) -> None:
    """--quick: small random prompts and short answers, unless given."""
    a.num, a.input_len, a.output_len = num, 64, 8
    if rate is not None:
        a.rate = rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    ap.add_argument("--rate", type=float, default=None, help="requests (sessions) per second; none: all at once")
    a = ap.parse_args()
    if a.quick:
        quick_defaults(a, 20, 10.0)
    sessions = workload_from(a)
    with endpoints(a) as (url, baseline_url, baseline_name):
        row = run_once(a, a.rate, sessions)
        base = None if baseline_url is None else run_once(a, a.rate, sessions, baseline_url, "baseline", out="")
    extra = {k: v for k, v in row.items() if k != "goodput_req_per_s"}
    if base is not None:
        extra |= {"baseline_slo_attainment": base["slo_attainment"], "baseline_ttft_p50_ms": base["ttft_p50_ms"],
                  "baseline_req_per_s": base["req_per_s"], "baseline_errors": base["errors"]}
    if a.quick and a.label == "mock (known delays)":
        extra |= {"true_ttft_ms": QUICK_TTFT_S * 1e3, "true_itl_ms": QUICK_ITL_S * 1e3}
    emit("run", "goodput_req_per_s", row["goodput_req_per_s"], "req/s", baseline_name if base else None,
         base["goodput_req_per_s"] if base else None, **extra)


if __name__ == "__main__":
    main()
