"""What every benchmark prints: one JSON object a line, with the hardware and versions beside the number."""

import json
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


def emit(bench: str, metric: str, value: float, unit: str, baseline: str | None = None,
         baseline_value: float | None = None, ratio: float | None = None, **extra: Any) -> dict:
    if ratio is None and baseline_value:
        ratio = value / baseline_value
    row = {"bench": bench, "metric": metric, "value": round(value, 4), "unit": unit, "baseline": baseline,
           "baseline_value": None if baseline_value is None else round(baseline_value, 4),
           "ratio": None if ratio is None else round(ratio, 4), "device": device_name(),
           "python": sys.version.split()[0], **extra}
    print(json.dumps(row), flush=True)
    return row
