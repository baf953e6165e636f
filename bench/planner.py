"""The SLA planner (router/planner.py) against a static pool sized for the peak, on a simulated cluster (JSON
lines): SLO attainment and GPU-hours on four traces (a ramp, a burst, a diurnal cycle, a shift from short to
long prompts), and the number of decisions an hour (no flapping).

The simulated cluster: prefill workers compute prompts one after another at the profile's tokens/s for the
prompt's length (a request goes to the worker free first); decode workers batch their streams, every stream
of a worker advancing one token a step of the profile's ITL for its batch size (up to `max_batch` streams; the
rest wait for a slot); a started worker serves after `spawn_delay_s`, a stopped one takes no new work and
leaves when its work is done; every worker counts its GPUs from its start to its end. A request meets the SLOs
when its TTFT and its mean ITL (time from first to last token over its tokens after the first) are within them.
The planner is the router's own code, fed what a router sees each interval (arrivals, prompt and output
tokens, queues).

  python -m bench.planner            # the four traces, two simulated hours of diurnal cycle
  python -m bench.planner --quick    # the same traces, 5 minutes each (the day: 20; a dry run, no bars)

The profile is illustrative (Llama-3-8B-like speeds on one H100, not measured); pass `--profile` a file from
`pdserve profile` to plan with a measured one.
"""

import argparse
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench.common import emit
from router.planner import POOLS, Decision, Observed, Planner, PlannerConfig, Profile

ILLUSTRATIVE = Profile(prefill=[(128, 9000), (512, 13000), (2048, 15000), (8192, 12000)],
                       decode=[(1, 0.008), (16, 0.009), (64, 0.012), (128, 0.016), (256, 0.025)],
                       model="illustrative: Llama-3-8B-like speeds on one H100 (not measured)", worker="1 GPU")


@dataclass
class Trace:
    """Arrival rate (requests/s) and request shape (prompt, output tokens) over simulated time."""

    name: str
    seconds: float
    rate: Callable[[float], float]  # t -> requests/s
    shape: Callable[[float], tuple[int, int]] = lambda t: (1500, 300)  # t -> (mean prompt, mean output tokens)
    hit: float = 0.2  # share of prompt tokens found cached


def traces(scale: float = 1.0, minutes: float = 30.0) -> dict[str, Trace]:
    """The four traces; scale multiplies rates, minutes sets the length (the diurnal cycle is four times as long)."""
    s = minutes * 60

    def burst(t):
        return scale * (15 if not 0.35 * s <= t < 0.35 * s + 180 else 45)

    def shift(t):
        return (300, 600) if t < s / 2 else (4000, 60)

    day = 4 * s
    return {
        "ramp": Trace("ramp", s, lambda t: scale * (4 + 36 * t / s)),
        "burst": Trace("burst", s, burst),
        "diurnal": Trace("diurnal", day, lambda t: scale * (4 + 36 * (1 - math.cos(2 * math.pi * t / day)) / 2)),
        "shift": Trace("shift", s, lambda t: scale * 12, shift),
    }


@dataclass
class Req:
    arrival: float
    prompt: int
    output: int
    first: float = math.inf  # when its first token came (its prompt computed)
    done: float = math.inf


@dataclass
class Worker:
    ready: float  # serves from then on
    started: float
    stopping: bool = False
    free: float = 0.0  # prefill: when the queue it has taken ends
    # decode: every stream advances alike, so a worker counts the tokens a stream got since it started
    # (`progress`) and keeps its streams in a heap by the progress at which each ends
    progress: float = 0.0
    streams: list = field(default_factory=list)  # (progress at its end, seq, request)


class SimCluster:
    def __init__(self, profile: Profile, replicas: dict[str, int], spawn_delay_s: float = 30.0,
                 max_batch: int = 256):
        self.profile, self.spawn_delay_s, self.max_batch = profile, spawn_delay_s, max_batch
        self.workers: dict[str, list[Worker]] = {p: [Worker(0.0, 0.0) for _ in range(replicas[p])] for p in POOLS}
        self.gpu_seconds = 0.0
        self.waiting_prefill: list[Req] = []  # no prefill worker serving yet
        self.prefilling: list[tuple[float, int, Req]] = []  # (first token time, seq, request): a heap
        self.waiting_decode: list[Req] = []
        self.seq = 0
        self.ended: list[Req] = []  # since the planner last looked

    def replicas(self, pool: str) -> int:
        return sum(not w.stopping for w in self.workers[pool])

    def scale(self, pool: str, n: int, now: float) -> None:
        ws = self.workers[pool]
        while self.replicas(pool) < n:
            ws.append(Worker(now + self.spawn_delay_s, now))
        live = sorted((w for w in ws if not w.stopping), key=lambda w: (-w.ready, -w.started))
        for w in live[: max(0, len(live) - n)]:  # the newest first (not serving yet, if any)
            w.stopping = True

    def _prefill(self, r: Req, now: float, hit: float) -> bool:
        ws = [w for w in self.workers["prefill"] if not w.stopping and w.ready <= now]
        if not ws:
            return False
        w = min(ws, key=lambda w: w.free)
        w.free = max(w.free, now) + r.prompt * (1 - hit) / self.profile.prefill_rate(r.prompt)
        r.first = w.free
        self.seq += 1
        heapq.heappush(self.prefilling, (r.first, self.seq, r))
        return True

    def arrive(self, r: Req, now: float, hit: float) -> None:
        if self.waiting_prefill or not self._prefill(r, now, hit):
            self.waiting_prefill.append(r)

    def queued_prefill_tokens(self, now: float) -> int:
        """Prompt tokens not computed yet (the queues' remaining work, as tokens at the worker's speed)."""
        waiting = sum(r.prompt for r in self.waiting_prefill)
        return waiting + sum(r.prompt for _, _, r in self.prefilling if r.first > now)

    def tick(self, now: float, dt: float, hit: float, context: float = 0.0) -> None:
        """Advance the cluster from now to now + dt (decoding sequences attending to `context` tokens)."""
        while self.waiting_prefill and self._prefill(self.waiting_prefill[0], now, hit):
            self.waiting_prefill.pop(0)
        end = now + dt
        while self.prefilling and self.prefilling[0][0] <= end:
            self.waiting_decode.append(heapq.heappop(self.prefilling)[2])
        serving = [w for w in self.workers["decode"] if not w.stopping and w.ready <= now]
        while self.waiting_decode and serving:
            w = min(serving, key=lambda w: len(w.streams))
            if len(w.streams) >= self.max_batch:
                break
            r = self.waiting_decode.pop(0)
            self.seq += 1
            heapq.heappush(w.streams, (w.progress + r.output - 1, self.seq, r))
        for w in self.workers["decode"]:
            if not w.streams:
                continue
            step = self.profile.itl(len(w.streams), context)
            w.progress += dt / step  # (a stream that came in this tick counts it whole: at most dt late)
            while w.streams and w.streams[0][0] <= w.progress:
                at, _, r = heapq.heappop(w.streams)
                r.done = end - (w.progress - at) * step
                self.ended.append(r)
        for pool in POOLS:
            ws = self.workers[pool]
            self.gpu_seconds += len(ws) * dt * self.profile.gpus_per_worker
            self.workers[pool] = [w for w in ws if not (w.stopping and not w.streams and w.free <= end)]


def simulate(trace: Trace, profile: Profile, config: PlannerConfig, static: dict[str, int] | None = None,
             spawn_delay_s: float = 30.0, dt: float = 0.25, seed: int = 0) -> dict:
    """Run the trace on the simulated cluster, planned (static None) or with static pool sizes."""
    rng = np.random.default_rng(seed)
    start = static or sizes_for(trace, profile, config, [0.0])  # (a cluster already running at the first rate)
    cluster = SimCluster(profile, start, spawn_delay_s)
    planner = None if static else Planner(profile, config)
    reqs: list[Req] = []
    decisions: list[Decision] = []
    since, seen = 0, {"prompt": 0}
    t, next_plan = 0.0, config.interval_s
    while t < trace.seconds:
        prompt, output = trace.shape(t)
        for _ in range(rng.poisson(trace.rate(t) * dt)):
            r = Req(t + rng.uniform(0, dt), max(1, int(rng.uniform(0.5, 1.5) * prompt)),
                    max(2, int(rng.uniform(0.5, 1.5) * output)))
            reqs.append(r)
            cluster.arrive(r, r.arrival, trace.hit)
            seen["prompt"] += r.prompt
        cluster.tick(t, dt, trace.hit, prompt + output / 2)
        t += dt
        if planner is not None and t >= next_plan:
            ended = cluster.ended
            o = Observed(seconds=config.interval_s, arrivals=len(reqs) - since, prompt_tokens=seen["prompt"],
                         cached_tokens=int(seen["prompt"] * trace.hit), finished=len(ended),
                         output_tokens=sum(r.output for r in ended),
                         queued_prefill_tokens=cluster.queued_prefill_tokens(t),
                         waiting_decode=len(cluster.waiting_decode),
                         replicas={p: cluster.replicas(p) for p in POOLS})
            d = planner.decide(o, t)
            if d.changes:
                decisions.append(d)
                for pool, n in d.replicas.items():
                    cluster.scale(pool, n, t)
            since, seen, cluster.ended = len(reqs), {"prompt": 0}, []
            next_plan += config.interval_s
    counted = [r for r in reqs if r.arrival < trace.seconds - 60]  # (the last minute's may not have ended)
    good = sum(r.first - r.arrival <= config.ttft_slo_s
               and (r.done - r.first) / max(1, r.output - 1) <= config.itl_slo_s for r in counted)
    return {"requests": len(reqs), "attainment": good / max(1, len(counted)),
            "gpu_hours": cluster.gpu_seconds / 3600, "decisions": decisions,
            "decisions_per_hour": len(decisions) / (trace.seconds / 3600)}


def sizes_for(trace: Trace, profile: Profile, config: PlannerConfig, times) -> dict[str, int]:
    """The planner's own sizing for the highest rate at these times, with each request shape seen then."""
    planner = Planner(profile, config)
    peak = max(trace.rate(t) for t in times)
    out = {p: config.min_replicas[p] for p in POOLS}
    for prompt, output in {trace.shape(t) for t in times}:
        planner.mean_prompt, planner.mean_output, planner.hit = prompt, output, trace.hit
        needs, _, _ = planner.needs(peak, Observed(1.0, 0, 0, 0, 0, 0))
        out = {p: max(out[p], math.ceil(needs[p] - 1e-9)) for p in POOLS}
    return out


def peak_sizes(trace: Trace, profile: Profile, config: PlannerConfig) -> dict[str, int]:
    """A static pool for the trace's peak (the baseline)."""
    return sizes_for(trace, profile, config, np.linspace(0, trace.seconds, 400))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5-minute traces: a dry run (CPU, seconds), no bars")
    ap.add_argument("--profile", default=None, help="a profile from `pdserve profile` (default: illustrative)")
    ap.add_argument("--ttft-slo-s", type=float, default=2.0)
    ap.add_argument("--itl-slo-s", type=float, default=0.05)
    a = ap.parse_args()
    profile = Profile.load(a.profile) if a.profile else ILLUSTRATIVE
    config = PlannerConfig(ttft_slo_s=a.ttft_slo_s, itl_slo_s=a.itl_slo_s, interval_s=10.0,
                           max_replicas={"prefill": 64, "decode": 64})
    bars = {} if a.quick else {"diurnal": (0.95, 0.70), "burst": (0.90, None)}  # (--quick: too short for them)
    for name, trace in traces(scale=3.0, minutes=5.0 if a.quick else 30.0).items():
        static = peak_sizes(trace, profile, config)
        base = simulate(trace, profile, config, static=static)
        planned = simulate(trace, profile, config)
        attain_bar, hours_bar = bars.get(name, (None, None))
        emit("planner", f"{name}_gpu_hours", planned["gpu_hours"], "GPU-hours", baseline="static pool sized for the peak",
             baseline_value=base["gpu_hours"], bar=hours_bar, simulated_s=trace.seconds, static_replicas=static,
             attainment=round(planned["attainment"], 4), static_attainment=round(base["attainment"], 4),
             attainment_bar=attain_bar, requests=planned["requests"],
             decisions_per_hour=round(planned["decisions_per_hour"], 1),
             final_replicas=planned["decisions"][-1].replicas if planned["decisions"] else None)


if __name__ == "__main__":
    main()
