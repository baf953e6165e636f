"""Run a workload at increasing rates; report the highest rate at which >= 90% of requests meet the TTFT
and TPOT SLOs (DistServe's "max goodput" figure).

  python -m bench.sweep --url http://127.0.0.1:8000 --workload sharegpt --num 200 --rates 1,2,4,8
"""

import argparse

from bench.common import emit
from bench.run import add_args, run_once, workload_from


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_args(ap)
    ap.add_argument("--rates", required=True, help="comma-separated request rates")
    ap.add_argument("--attainment", type=float, default=0.9)
    a = ap.parse_args()
    sessions = workload_from(a)
    best = None
    for rate in sorted(float(r) for r in a.rates.split(",")):
        row = run_once(a, rate, sessions)
        emit("sweep", "slo_attainment", row["slo_attainment"], "share", "required", a.attainment,
             ratio=row["slo_attainment"] / a.attainment, **{k: v for k, v in row.items() if k != "slo_attainment"})
        if row["slo_attainment"] >= a.attainment:
            best = rate
    emit("sweep", "max_goodput_rate", best or 0.0, "req/s", "highest rate tried", max(map(float, a.rates.split(","))),
         label=a.label or a.url, workload=a.workload, ttft_slo_s=a.ttft_slo, tpot_slo_s=a.tpot_slo)


if __name__ == "__main__":
    main()
