"""Compare result files of bench.run/bench.sweep: a markdown table and PNG plots (latency CDFs, goodput vs
request rate), and one JSON line a result row (its goodput; no ratio: the rows may come from different runs).

  python -m bench.compare a.jsonl b.jsonl --out compare/

--quick: makes its own result files first (bench.run against a mock with known delays and an ideal mock, two
rates each, 10 requests a rate), then compares them into a temporary folder.
"""

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import emit

COLUMNS = ("label", "workload", "rate", "ok", "errors", "req_per_s", "output_tok_per_s", "ttft_p50_ms", "ttft_p99_ms",
           "itl_p50_ms", "itl_p99_ms", "e2e_p99_ms", "goodput_req_per_s", "slo_attainment", "cache_hit_ratio")


def _fmt(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    made = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        name = f"{r.get('label')} @ {r.get('rate')}"
        for ax, key in zip(axes, ("ttft_s", "tpot_s"), strict=True):
            vals = np.sort(np.array(r.get("per_request", {}).get(key, []), dtype=float)) * 1e3
            if len(vals):
                ax.plot(vals, np.arange(1, len(vals) + 1) / len(vals), label=name)
    for ax, title in zip(axes, ("TTFT (ms)", "time per output token (ms)"), strict=True):
        _label(ax, title, "share of requests")
    made.append(_save(plt, fig, out / "latency_cdf.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted({str(r.get("label")) for r in rows}):
        pts = sorted((r["rate"], r.get("goodput_req_per_s", 0.0)) for r in rows
                     if str(r.get("label")) == label and r.get("rate") is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    _label(ax, "offered rate (req/s)", "goodput (req/s meeting the SLOs)")
    made.append(_save(plt, fig, out / "goodput_vs_rate.png"))
    return made


def _label(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quick_results(folder: Path) -> list[str]:
    """bench.run's result files for two mocks at two rates each (the input --quick compares)."""
    from bench.run import add_args, quick_defaults, run_once, start_mock, stop, workload_from

    ap = argparse.ArgumentParser()
    add_args(ap)
    files = []
    for label, ttft_s, itl_s in (("mock 50 ms + 10 ms/token", 0.05, 0.01), ("ideal mock", 0.0, 0.0)):
        url, proc = start_mock(ttft_s, itl_s)
        try:
            a = ap.parse_args(["--url", url, "--label", label, "--out", str(folder / f"{len(files)}.jsonl")])
            quick_defaults(a, 10, None)
            for rate in (10.0, 40.0):
                run_once(a, rate, workload_from(a))
        finally:
            stop(proc)
        files.append(a.out)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*")
    ap.add_argument("--out", default=None, help="default: compare/ (--quick: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="compare result files made here against two mocks")
    a = ap.parse_args()
    if a.quick:
        scratch = Path(tempfile.mkdtemp(prefix="pdserve-compare-"))
        a.files, a.out = a.files or quick_results(scratch), a.out or str(scratch / "compare")
    if not a.files:
        raise SystemExit("give result files (bench.run --out), or --quick")
    rows = [json.loads(line) for f in a.files for line in Path(f).read_text().splitlines() if line.strip()]
    out = Path(a.out or "compare")
    out.mkdir(parents=True, exist_ok=True)
    md = table(rows)
    (out / "table.md").write_text(md)
    print(md)
    made = plots(rows, out)
    for p in made:
        print(f"wrote {p}")
    for r in rows:
        emit("compare", "goodput_req_per_s", r.get("goodput_req_per_s") or 0.0, "req/s", label=r.get("label"),
             rate=r.get("rate"), workload=r.get("workload"), slo_attainment=r.get("slo_attainment"),
             ttft_p50_ms=r.get("ttft_p50_ms"), table=str(out / "table.md"), plots=[str(p) for p in made])


if __name__ == "__main__":
    main()
