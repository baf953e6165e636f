"""Compare result files of bench.run/bench.sweep: a markdown table and PNG plots (latency CDFs, goodput vs
request rate). python -m bench.compare a.jsonl b.jsonl --out compare/"""

import argparse
import json
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default="compare")
    a = ap.parse_args()
    rows = [json.loads(line) for f in a.files for line in Path(f).read_text().splitlines() if line.strip()]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table(rows)
    (out / "table.md").write_text(md)
    print(md)
    for p in plots(rows, out):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
