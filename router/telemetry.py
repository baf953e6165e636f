"""What the dashboard charts: the cluster's last minutes in 2-second buckets (request rate, TTFT and ITL
percentiles, tokens/s), and the most recent errors. In-process and cheap: a bucket is a few counters and
the latency samples of its two seconds (bounded)."""

import time
from collections import deque
from dataclasses import dataclass, field

BUCKET_S = 2.0
KEEP_S = 600.0  # ten minutes
MAX_SAMPLES = 2000  # latency samples kept a bucket


@dataclass
class Bucket:
    start: float
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class Demand:
    """Running totals of what came and what was served, for the planner (router/planner_loop.py), which reads
    the difference over each interval."""

    arrivals: int = 0  # requests tokenized, refused ones included
    prompt_tokens: int = 0
    finished: int = 0  # requests served to their end
    output_tokens: int = 0
    cached_tokens: int = 0  # of the finished requests' prompts


class Telemetry:
    def __init__(self) -> None:
        self.buckets: deque[Bucket] = deque(maxlen=int(KEEP_S / BUCKET_S))
        self.errors: deque[dict] = deque(maxlen=50)
        self.demand = Demand()

    def arrived(self, prompt_tokens: int) -> None:
        self.demand.arrivals += 1
        self.demand.prompt_tokens += prompt_tokens

    def served(self, output_tokens: int, cached_tokens: int) -> None:
        self.demand.finished += 1
        self.demand.output_tokens += output_tokens
        self.demand.cached_tokens += cached_tokens

    def _now(self) -> Bucket:
        start = time.time() // BUCKET_S * BUCKET_S
        if not self.buckets or self.buckets[-1].start != start:
            self.buckets.append(Bucket(start))
        return self.buckets[-1]

    def request(self, status: str, completion_tokens: int = 0) -> None:
        b = self._now()
        b.requests += 1
        b.tokens += completion_tokens
        if status not in ("200", "499"):
            b.errors += 1

    def ttft(self, seconds: float) -> None:
        b = self._now()
        if len(b.ttft) < MAX_SAMPLES:
            b.ttft.append(seconds)

    def itl(self, seconds: float) -> None:
        b = self._now()
        if len(b.itl) < MAX_SAMPLES:
            b.itl.append(seconds)

    def error(self, status: int, code: str | None, message: str) -> None:
        self.errors.appendleft({"time": time.time(), "status": status, "code": code, "message": message[:300]})

    def series(self, seconds: float = 300.0) -> dict[str, list]:
        """Per bucket over the last `seconds`: time, req/s, errors/s, tokens/s, TTFT/ITL p50/p99 (ms)."""
        now = time.time() // BUCKET_S * BUCKET_S
        by_start = {b.start: b for b in self.buckets}
        out: dict[str, list] = {k: [] for k in ("t", "rps", "errors", "tokens_per_s", "ttft_p50_ms",
                                                 "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")}
        start = now - seconds + BUCKET_S
        t = start
        while t <= now:
            b = by_start.get(t, Bucket(t))
            out["t"].append(t)
            out["rps"].append(b.requests / BUCKET_S)
            out["errors"].append(b.errors / BUCKET_S)
            out["tokens_per_s"].append(b.tokens / BUCKET_S)
            for name, values in (("ttft", b.ttft), ("itl", b.itl)):
                for q in (50, 99):
                    v = _pct(values, q / 100)
                    out[f"{name}_p{q}_ms"].append(None if v is None else round(v * 1000, 2))
            t += BUCKET_S
        return out

    def recent(self, seconds: float = 60.0) -> dict[str, float | None]:
        """Totals over the last `seconds` (what scaling advice reads)."""
        since = time.time() - seconds
        bs = [b for b in self.buckets if b.start >= since]
        ttft = [v for b in bs for v in b.ttft]
        itl = [v for b in bs for v in b.itl]
        return {"rps": sum(b.requests for b in bs) / seconds, "ttft_p99_s": _pct(ttft, 0.99),
                "itl_p99_s": _pct(itl, 0.99)}
