"""The SLA planner's decisions: how many prefill and how many decode workers the next interval needs to meet
the TTFT and ITL targets with the fewest GPUs, from a worker's measured profile and what the router saw.

Pure and clocked by its caller (`Planner.decide(observed, now)`), so the same code runs in the router
(router/planner_loop.py) and against the simulated cluster of bench/planner.py and its tests.

- Demand is what arrived, refused requests included (saturation hidden by 503s is still demand), as prompt
  tokens to compute (cached ones are not) and output tokens to stream, with the queues left behind.
- Forecast: the larger of the last interval's rate and a smoothed trend (Holt), so a burst is planned for
  within one interval and a ramp a little ahead of itself.
- Prefill: a worker computes `profile.prefill_rate(prompt)` tokens/s; its queue is taken as M/D/1, so its
  load may rise only as far as keeps the mean TTFT at `ttft_margin` of the target; a backlog of queued
  prompt tokens adds what clears it within `queue_clear_intervals`.
- Decode: a worker holds the largest batch whose ITL (the profile's, at the mean context: prompt and half the
  output) is within `itl_margin` of the target;
  Little's law gives the streams in flight (rate x output tokens x that ITL); requests waiting for a slot
  add theirs.
- Never flapping: a pool grows as soon as it needs to; it shrinks only once it has not grown for
  `scale_down_window_s`, and then only to the largest need of that window; never below min or above max.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

POOLS = ("prefill", "decode")


def _interp(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through the points (sorted by x), flat past either end."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


@dataclass
class Profile:
    """A worker's measured speeds (`pdserve profile`): prefill tokens/s by prompt length, and the decode step by
    batch size and context (the tokens each sequence attends to)."""

    prefill: list[tuple[int, float]]  # (prompt tokens, prompt tokens computed a second)
    decode: list  # (batch size, context tokens, seconds a decode step); a (batch, seconds) pair holds at any context
    model: str = ""
    worker: str = ""  # the worker's shape (device, tp), as measured
    gpus_per_worker: int = 1

    def __post_init__(self):
        self.prefill = sorted((int(n), float(r)) for n, r in self.prefill)
        self.decode = sorted((int(e[0]), int(e[1]) if len(e) == 3 else 0, float(e[-1])) for e in self.decode)
        if not self.prefill or not self.decode:
            raise ValueError("a profile needs prefill and decode measurements")
        self._curves: dict[int, list[tuple[int, float]]] = {}  # context -> (batch, step) points
        for b, c, s in self.decode:
            self._curves.setdefault(c, []).append((b, s))

    def prefill_rate(self, prompt_tokens: float) -> float:
        return _interp(self.prefill, prompt_tokens)

    def itl(self, batch: float, context: float = 0.0) -> float:
        """The decode step at this batch size, each sequence at this context (interpolated in both)."""
        return _interp(sorted((c, _interp(curve, batch)) for c, curve in self._curves.items()), context)

    def max_batch(self, itl_s: float, context: float = 0.0) -> int:
        """The largest batch (up to the largest measured) whose step takes at most itl_s; at least 1. (The step
        grows with the batch.)"""
        lo, hi = 1, max(b for b, _, _ in self.decode)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.itl(mid, context) <= itl_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls(**json.loads(Path(path).read_text()))

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


@dataclass
class Observed:
    """What the router saw over the last interval, and the queues at its end."""

    seconds: float
    arrivals: int  # requests that arrived, refused ones included
    prompt_tokens: int  # their prompt tokens
    cached_tokens: int  # of those, found in a KV cache (not computed)
    finished: int  # requests that ended
    output_tokens: int  # their output tokens
    queued_prefill_tokens: int = 0  # prompt tokens waiting to be computed now
    waiting_decode: int = 0  # requests waiting for a decode slot now
    replicas: dict[str, int] = field(default_factory=dict)  # workers in each pool now (starting ones included)


@dataclass
class PlannerConfig:
    ttft_slo_s: float
    itl_slo_s: float
    interval_s: float = 30.0
    min_replicas: dict[str, int] = field(default_factory=lambda: {"prefill": 1, "decode": 1})
    max_replicas: dict[str, int] = field(default_factory=lambda: {"prefill": 16, "decode": 16})
    scale_down_window_s: float = 300.0  # a pool shrinks to the largest need seen over this long
    ttft_margin: float = 0.5  # plan the mean TTFT at this share of the target (tails are longer)
    itl_margin: float = 0.85  # plan the ITL at this share of the target
    max_utilisation: float = 0.85  # never plan a prefill worker busier than this
    smoothing: float = 0.3  # the forecast's level and trend smoothing (Holt)
    queue_clear_intervals: float = 3.0  # queued work is planned to clear over this many intervals


@dataclass
class Decision:
    time: float
    replicas: dict[str, int]  # what each pool should have
    before: dict[str, int]  # what each pool had
    needs: dict[str, float]  # the fractional workers each pool needs now
    reasons: dict[str, str]  # why, in words, a pool

    @property
    def changes(self) -> dict[str, int]:
        return {p: self.replicas[p] - self.before.get(p, 0) for p in POOLS if self.replicas[p] != self.before.get(p, 0)}


class Planner:
    def __init__(self, profile: Profile, config: PlannerConfig):
        self.profile, self.config = profile, config
        self.level: float | None = None  # the forecast's smoothed rate and trend (requests/s)
        self.trend = 0.0
        self.mean_prompt, self.mean_output, self.hit = 0.0, 0.0, 0.0
        self.history: list[tuple[float, dict[str, float]]] = []  # (time, needs) within the scale-down window
        self.grown: dict[str, float] = {}  # pool -> when it last grew (or the planner first looked)

    def forecast(self, rate: float) -> float:
        """The next interval's arrival rate: the smoothed level and trend, never below what just arrived."""
        a = self.config.smoothing
        if self.level is None:
            self.level = rate
        else:
            previous = self.level
            self.level = a * rate + (1 - a) * (self.level + self.trend)
            self.trend = a * (self.level - previous) + (1 - a) * self.trend
        return max(rate, self.level + self.trend, 0.0)

    def _shape(self, o: Observed) -> None:
        """Mean prompt and output lengths (of the requests that arrived, and of those that ended) and the cache
        hit ratio, smoothed (each kept while nothing new is seen)."""
        if o.arrivals:
            a = 0.5 if self.mean_prompt else 1.0
            self.mean_prompt += a * (o.prompt_tokens / o.arrivals - self.mean_prompt)
            self.hit += a * (o.cached_tokens / max(1, o.prompt_tokens) - self.hit)
        if o.finished:
            a = 0.5 if self.mean_output else 1.0
            self.mean_output += a * (max(1.0, o.output_tokens / o.finished) - self.mean_output)

    def needs(self, rate: float, o: Observed) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
        """The fractional workers each pool needs for `rate` requests/s, the more it needs to clear the queues of
        o over `queue_clear_intervals`, and why."""
        c, p = self.config, self.profile
        prompt = max(1.0, self.mean_prompt)
        speed = p.prefill_rate(prompt)
        service = prompt / speed  # one prompt's compute, s
        target = c.ttft_margin * c.ttft_slo_s
        # M/D/1: mean TTFT = S + rho S / (2 (1 - rho)) <= target  ->  rho <= 2 (target - S) / (2 target - S)
        rho = c.max_utilisation if target <= service else min(c.max_utilisation,
                                                               2 * (target - service) / (2 * target - service))
        rho = max(rho, 0.05)
        tokens = rate * prompt * (1 - self.hit)
        context = prompt + self.mean_output / 2  # what a decoding sequence attends to, on average
        batch = p.max_batch(c.itl_margin * c.itl_slo_s, context)
        streams = rate * self.mean_output * p.itl(batch, context)  # Little's law at the planned ITL
        steady = {"prefill": tokens / (speed * rho), "decode": streams / batch}
        # A queue is demand the rate already counted: what is added clears it over a few intervals, not one.
        clear_s = c.queue_clear_intervals * c.interval_s
        queues = {"prefill": o.queued_prefill_tokens / (speed * clear_s), "decode": o.waiting_decode / batch}
        reasons = {
            "prefill": f"{rate:.2f} req/s x {prompt:.0f} prompt tokens ({self.hit:.0%} cached) at {speed:.0f} tok/s a "
                       f"worker, planned {rho:.0%} busy for TTFT {c.ttft_slo_s:g} s"
                       + (f"; {o.queued_prefill_tokens} tokens queued" if o.queued_prefill_tokens else ""),
            "decode": f"{streams:.1f} streams ({rate:.2f} req/s x {self.mean_output:.0f} tokens) at up to {batch} a "
                      f"worker for ITL {c.itl_slo_s * 1000:.0f} ms"
                      + (f"; {o.waiting_decode} waiting for a slot" if o.waiting_decode else ""),
        }
        return steady, queues, reasons

    def decide(self, o: Observed, now: float) -> Decision:
        c = self.config
        self._shape(o)
        rate = self.forecast(o.arrivals / max(o.seconds, 1e-9))
        steady, queues, reasons = self.needs(rate, o)
        # (the window holds the steady needs: a queue once cleared needs nothing more)
        self.history = [(t, n) for t, n in self.history if t > now - c.scale_down_window_s] + [(now, steady)]
        needs = {p: steady[p] + queues[p] for p in POOLS}
        out = {}
        for pool in POOLS:
            now_need = math.ceil(needs[pool] - 1e-9)
            held = math.ceil(max(n[pool] for _, n in self.history) - 1e-9)  # the window's largest need
            current = o.replicas.get(pool, 0)
            if now_need > current:
                want = now_need
                self.grown[pool] = now
            elif now - self.grown.setdefault(pool, now) < c.scale_down_window_s:
                want = current  # grown (or first seen) within the window: not shrunk yet
            else:
                want = max(now_need, min(current, held))
                if want < current:
                    reasons[pool] += f"; the largest need over {c.scale_down_window_s:g} s is {held}"
            out[pool] = min(c.max_replicas[pool], max(c.min_replicas[pool], want))
        return Decision(now, out, dict(o.replicas), needs, reasons)
