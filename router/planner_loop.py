"""The SLA planner in the router: every interval the router that leads (a lease in Redis; a router without
Redis leads alone) reads what every router saw (their demand counters, summed through Redis), the pools'
queues and sizes, asks router/planner.py for the pool sizes, and resizes through the router's scaler (Ray
actors in `pdserve serve`, StatefulSets in Kubernetes; scale-down drains as the dashboard's buttons do). In
dry-run mode, or without a scaler, it only reports. Each decision and its reasons go to the dashboard
(`decisions`) and to metrics.
"""

import asyncio
import dataclasses
import logging
import time
from collections import deque

from router.metrics import RouterMetrics
from router.planner import POOLS, Observed, Planner
from router.telemetry import Telemetry
from router.workers import WorkerPool

log = logging.getLogger("pdserve.router")
LEASE = "planner-leader"
DEMAND = "planner-demand"


class PlannerLoop:
    def __init__(self, planner: Planner, state, telemetry: Telemetry, pool: WorkerPool, metrics: RouterMetrics,
                 scaler=None, dry_run: bool = False):
        """state: the router's LocalState or RedisState (lease and share); scaler: None reports only."""
        self.planner, self.state, self.telemetry, self.pool, self.metrics = planner, state, telemetry, pool, metrics
        self.scaler, self.dry_run = scaler, dry_run or scaler is None
        self.interval_s = planner.config.interval_s
        self.decisions: deque[dict] = deque(maxlen=100)  # newest last, for the dashboard
        self.leading = False
        self._seen: dict[str, int] | None = None  # the summed demand counters at the last look
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick(time.time())
            except Exception as e:  # noqa: BLE001 - a planner that fails once must look again next interval
                log.error("planner: %r", e)

    async def tick(self, now: float) -> dict | None:
        """One interval: share this router's demand, and if this router leads, plan (and act). The decision
        (as the dashboard shows it), or None when another router leads or it is the first look."""
        mine = dataclasses.asdict(self.telemetry.demand)
        total = await self.state.share(DEMAND, mine, ttl_s=3 * self.interval_s)
        self.leading = await self.state.lease(LEASE, 2.5 * self.interval_s)
        self.metrics.planner_leader.set(int(self.leading))
        seen, self._seen = self._seen, total
        if not self.leading or seen is None:
            return None
        d = {k: max(0, total[k] - seen.get(k, 0)) for k in total}  # (a router that restarted counts from 0)
        replicas = {p: (await self.scaler.replicas(p)) if self.scaler is not None else len(self.pool.pool(p))
                    for p in POOLS}
        o = Observed(seconds=self.interval_s, arrivals=d["arrivals"], prompt_tokens=d["prompt_tokens"],
                     cached_tokens=d["cached_tokens"], finished=d["finished"], output_tokens=d["output_tokens"],
                     queued_prefill_tokens=sum(w.inflight_tokens for w in self.pool.prefill_pool()),
                     waiting_decode=sum(w.load.waiting for w in self.pool.pool("decode") if w.load is not None),
                     replicas=replicas)
        decision = self.planner.decide(o, now)
        for pool, n in decision.replicas.items():
            self.metrics.planner_replicas.labels(pool).set(n)
        changes = decision.changes
        for pool, delta in changes.items():
            self.metrics.planner_decisions.labels(pool, "up" if delta > 0 else "down").inc()
            if not self.dry_run:
                await self.scaler.scale(pool, decision.replicas[pool])
        shown = {"time": now, "replicas": decision.replicas, "before": decision.before,
                 "needs": {p: round(v, 2) for p, v in decision.needs.items()}, "reasons": decision.reasons,
                 "acted": bool(changes) and not self.dry_run,
                 "observed": {"arrivals": o.arrivals, "seconds": o.seconds, "finished": o.finished,
                              "queued_prefill_tokens": o.queued_prefill_tokens, "waiting_decode": o.waiting_decode}}
        if changes:
            self.decisions.append(shown)
            log.info("planner: %s -> %s (%s)%s", decision.before, decision.replicas, decision.reasons,
                     " [dry run]" if self.dry_run else "")
        return shown
