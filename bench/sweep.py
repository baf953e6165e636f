"""Run a workload at increasing rates; report the highest rate at which >= 90% of requests meet the TTFT
and TPOT SLOs (DistServe's "max goodput" figure).

  python -m bench.sweep --url http://127.0.0.1:8000 --workload sharegpt --num 200 --rates 1,2,4,8

The baseline, measured in the same run: the same sweep (same sessions, same arrival times, same load
generator) against a baseline endpoint, by default an ideal one (bench.mock_server answering at once, in its
own process; --baseline-url picks another server, `none` none; see bench.run). A rate's lines hold the
endpoint's goodput and SLO attainment against the baseline's at that rate; the last line holds the endpoint's
max goodput rate against the baseline's over the same rates, which is the highest rate tried unless the load
generator itself falls behind (then the rates are too high for one process: --procs).

Each rate gets prompts the endpoint has not seen at an earlier rate: a generated workload is made again with
the seed plus the rate's index (prefix, long and fixed prompts are random text: no block in common), ShareGPT
takes the rate's own slice of one shuffle. A saved workload (FILE.jsonl) is replayed whole at every rate, so
from the second rate on a server's prefix cache holds its prompts: save one file per rate, or restart the
server, for a cold start. --same-sessions replays the same sessions at every rate.

--quick: the endpoint measured is a mock with known delays that computes uncached prompt tokens one prompt at a
time (1,000 tokens/s, 64-token prompts: about 15 req/s at most), swept over 4, 16 and 64 req/s with a 250 ms
TTFT SLO, so the sweep finds a knee.
"""

import argparse
from typing import Any

from bench.common import emit
from bench.run import add_args, endpoints, quick_defaults, run_once, workload_from
from bench.workloads import make


def sessions_for_rate(a: argparse.Namespace, k: int, num_rates: int) -> list[dict[str, Any]]:
    """The sessions of the k-th rate: prompts no earlier rate sent (see the module's docstring)."""
    if a.same_sessions or a.workload.endswith(".jsonl"):
        return workload_from(a)
    if a.workload.startswith("sharegpt"):
        every = make(a.workload, a.num * num_rates, a.seed)
        return every[k * a.num:(k + 1) * a.num]
    return workload_from(a, seed=a.seed + k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    ap.add_argument("--rates", default=None, help="comma-separated request rates (required unless --quick)")
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--same-sessions", action="store_true", help="replay the same sessions at every rate")
    a = ap.parse_args()
    quick_target: tuple[str, ...] = ()
    if a.quick:
        from engine.tokenizer_files import tokenizer_dir
        from pdserve_cli.main import demo_model

        quick_defaults(a, 12, None)
        a.rates, a.ttft_slo = a.rates or "4,16,64", 0.25
        # The mock's cache needs a tokenizer (chats); the fixed workload's prompts are token ids.
        quick_target = ("--cache-blocks", "4096", "--prefill-tokens-per-s", "1000",
                        "--tokenizer-dir", str(tokenizer_dir(demo_model())))
    if not a.rates:
        raise SystemExit("--rates is required")
    rates = sorted(float(r) for r in a.rates.split(","))
    best, base_best = None, None
    with endpoints(a, quick_target) as (url, baseline_url, baseline_name):
        for k, rate in enumerate(rates):
            sessions = sessions_for_rate(a, k, len(rates))
            row = run_once(a, rate, sessions)
            base = None if baseline_url is None else run_once(a, rate, sessions, baseline_url, "baseline", out="")
            fields = {key: v for key, v in row.items() if key not in ("slo_attainment", "goodput_req_per_s")}
            emit("sweep", "slo_attainment", row["slo_attainment"], "share", baseline_name if base else None,
                 base["slo_attainment"] if base else None, required=a.attainment, **fields)
            emit("sweep", "goodput_req_per_s", row["goodput_req_per_s"], "req/s", baseline_name if base else None,
                 base["goodput_req_per_s"] if base else None, rate=rate, label=row["label"])
            if row["slo_attainment"] >= a.attainment:
                best = rate
            if base is not None and base["slo_attainment"] >= a.attainment:
                base_best = rate
    emit("sweep", "max_goodput_rate", best or 0.0, "req/s", baseline_name if baseline_url else None,
         None if baseline_url is None else base_best or 0.0, label=a.label or url, workload=a.workload,
         rates=rates, highest_rate_tried=rates[-1], ttft_slo_s=a.ttft_slo, tpot_slo_s=a.tpot_slo,
         attainment=a.attainment, distinct_sessions_a_rate=not (a.same_sessions or a.workload.endswith(".jsonl")))


if __name__ == "__main__":
    main()
