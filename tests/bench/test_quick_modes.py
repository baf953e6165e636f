"""Every benchmark's --quick runs here end to end, so none rots: it exits 0, prints JSON lines, and every line's
ratio is value / baseline_value (bench.common), except lines held against a hardware limit, which say so."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Modules of bench/ that are not benchmarks. Every other bench/*.py must take --quick, or
# test_every_bench_has_a_quick_mode fails.
NOT_BENCHES = {"__init__", "cluster", "common", "json_schemas", "loadgen", "mock_server", "raw_http", "workloads"}


def _takes_quick(path: Path) -> bool:
    """Whether the module adds a --quick flag, itself or through the add_args of a bench module it imports
    (bench.sweep takes bench.run's flags)."""
    text = path.read_text()
    if re.search(r"""add_argument\(\s*["']--quick["']""", text):
        return True
    return any(_takes_quick(ROOT / "bench" / f"{m}.py")
               for m in re.findall(r"from bench\.(\w+) import [^\n]*\badd_args\b", text))


def _modules() -> list[Path]:
    return sorted(p for p in (ROOT / "bench").glob("*.py") if p.stem not in NOT_BENCHES)


# Benches whose --quick a test of its own runs (and checks further).
RUN_ELSEWHERE = {"priorities": "tests/router/test_priorities.py"}
QUICK = [p.stem for p in _modules() if _takes_quick(p) and p.stem not in RUN_ELSEWHERE]


def test_every_bench_has_a_quick_mode():
    missing = [p.stem for p in _modules() if not _takes_quick(p)]
    assert not missing, f"benches without --quick (give them one): {missing}"


def _bounds(x: float) -> tuple[float, float]:
    """The interval a figure printed at 6 significant digits (bench.common) stands for."""
    err = abs(x) * 5e-6 + 1e-300
    return x - err, x + err


def check_ratio(row: dict) -> None:
    if row.get("hardware_limit"):
        assert row["ratio"] > 0, row
        return
    lo_v, hi_v = _bounds(row["value"])
    lo_b, hi_b = _bounds(row["baseline_value"])
    quotients = [v / b for v in (lo_v, hi_v) for b in (lo_b, hi_b)]
    # ratio == round(value / baseline_value, 4), within what the rounding of all three allows
    assert min(quotients) - 5.01e-5 <= row["ratio"] <= max(quotients) + 5.01e-5, row


@pytest.mark.slow  # CI runs the whole suite, slow ones included; -m "not slow" skips these locally
@pytest.mark.parametrize("bench", QUICK)
def test_quick_mode_runs_and_its_ratios_are_value_over_baseline(bench):
    run_quick(bench)


def run_quick(bench: str) -> list[dict]:
    """Run `python -m bench.<bench> --quick`; its JSON lines, checked."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # CI and the rest pass through
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", f"bench.{bench}", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 0, f"bench.{bench} --quick exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"bench.{bench} --quick printed no JSON line:\n{proc.stdout[-2000:]}"
    for row in rows:
        assert row["bench"] == bench and "device" in row, row
        if row.get("baseline_value") is not None and row.get("ratio") is not None:
            check_ratio(row)
    print(f"bench.{bench} --quick: {took:.1f} s, {len(rows)} lines")
    return rows
