"""One load run against any OpenAI-compatible endpoint; prints one JSON line and appends it (with the
per-request timings) to --out.

  python -m bench.run --url http://127.0.0.1:8000 --workload prefix --num 200 --rate 4 --out results.jsonl
"""

import argparse
import asyncio
import json
from typing import Any

import httpx

from bench.common import emit
from bench.loadgen import run_workload, summarize
from bench.workloads import load, make, save


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--url", required=True, help="base URL (without /v1)")
    ap.add_argument("--model", default=None, help="default: the first of /v1/models")
    ap.add_argument("--workload", default="fixed", help="sharegpt | sharegpt-single | prefix | long | fixed | FILE.jsonl")
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


def workload_from(a: argparse.Namespace) -> list[dict[str, Any]]:
    if a.workload.endswith(".jsonl"):
        return load(a.workload)
    sessions = make(a.workload, a.num, a.seed, input_len=a.input_len, output_len=a.output_len, vocab=a.vocab)
    if a.save_workload:
        save(sessions, a.save_workload)
    return sessions


def run_once(a: argparse.Namespace, rate: float | None, sessions: list[dict[str, Any]]) -> dict[str, Any]:
    model = a.model or httpx.get(f"{a.url}/v1/models", timeout=10).json()["data"][0]["id"]
    results, wall = asyncio.run(run_workload(a.url, model, sessions, rate, a.arrival, a.concurrency, a.seed,
                                             a.warmup, a.duration, procs=a.procs))
    summary = summarize(results, wall, a.ttft_slo, a.tpot_slo)
    config = {"label": a.label or a.url, "workload": a.workload, "rate": rate, "arrival": a.arrival,
              "seed": a.seed, "ttft_slo_s": a.ttft_slo, "tpot_slo_s": a.tpot_slo, "model": model}
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps({**config, **summary}) + "\n")
    return {**config, **{k: v for k, v in summary.items() if k != "per_request"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_args(ap)
    ap.add_argument("--rate", type=float, default=None, help="requests (sessions) per second; none: all at once")
    a = ap.parse_args()
    row = run_once(a, a.rate, workload_from(a))
    emit("run", "goodput_req_per_s", row["goodput_req_per_s"], "req/s", "offered rate", a.rate,
         ratio=row["slo_attainment"], **{k: v for k, v in row.items() if k != "goodput_req_per_s"})


if __name__ == "__main__":
    main()
