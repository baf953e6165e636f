"""What every benchmark prints: one JSON object a line, with the hardware and versions beside the number.

A line's `ratio` is `value / baseline_value`, the baseline measured in the same run. The one exception is a
line held against a hardware limit measured in the same run (a memory roofline, a matmul peak): it carries
`hardware_limit: true` and its ratio is the share of the limit reached, whatever the units.
"""

import json
import math
import platform
import sys
from typing import Any


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu ({platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores)"


def _significant(x: float) -> float:
    """Six significant digits: small CPU figures (0.0191 TB/s) keep their precision, large ones lose noise."""
    return float(f"{x:.6g}")


def emit(bench: str, metric: str, value: float, unit: str, baseline: str | None = None,
         baseline_value: float | None = None, ratio: float | None = None, hardware_limit: bool = False,
         **extra: Any) -> dict:
    """Print one result line. Leave `ratio` out: it is value / baseline_value. Only a line against a hardware
    limit (hardware_limit=True) passes its own ratio, the share of the limit reached."""
    if hardware_limit:
        if ratio is None or baseline_value is None:
            raise ValueError(f"{bench}.{metric}: a line against a hardware limit needs the limit and its ratio")
        extra["hardware_limit"] = True
    elif baseline_value:
        if ratio is not None and not math.isclose(ratio, value / baseline_value, rel_tol=1e-6):
            raise ValueError(f"{bench}.{metric}: ratio {ratio} is not value / baseline_value "
                             f"({value} / {baseline_value})")
        ratio = value / baseline_value
    elif ratio is not None:
        raise ValueError(f"{bench}.{metric}: a ratio without a baseline")
    row = {"bench": bench, "metric": metric, "value": _significant(value), "unit": unit, "baseline": baseline,
           "baseline_value": None if baseline_value is None else _significant(baseline_value),
           "ratio": None if ratio is None else round(ratio, 4), "device": device_name(),
           "python": sys.version.split()[0], **extra}
    print(json.dumps(row), flush=True)
    return row
