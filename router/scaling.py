"""Resizing the prefill and decode pools: one interface, two back ends, and the advice an operator (or an
autoscaler) acts on.

- `KubernetesScaler` patches the pool's StatefulSet scale. Kubernetes stops the highest ordinals: each gets
  SIGTERM, leaves the router's pool at once (discovery drops terminating pods) and finishes what it has
  before it exits (the worker's graceful drain, preStop hook and grace period in the chart).
- The embedded back end (`pdserve_cli.ray_scaler.RayScaler`) starts and stops worker actors in the local
  Ray instance, draining a worker in the router before stopping it.

`advise()` turns queues, latency against the SLOs and KV usage into a worker count per pool, with reasons.
"""

import asyncio
import math
from typing import Any, Protocol

from router.telemetry import Telemetry
from router.workers import WorkerPool

POOLS = ("prefill", "decode")


class Scaler(Protocol):
    async def replicas(self, pool: str) -> int:
        """The desired number of workers in the pool."""

    async def scale(self, pool: str, replicas: int) -> None:
        """Start resizing the pool (returns once the change is under way)."""

    def start(self) -> None:
        """Begin whatever runs beside the router (the embedded back end restarts workers that die)."""


class KubernetesScaler:
    """`api` is an AppsV1Api (or anything with its read/patch_namespaced_stateful_set_scale). A pod that dies
    is restarted by Kubernetes (the chart's probes and StatefulSets), not here."""

    def __init__(self, namespace: str, statefulsets: dict[str, str], api: Any = None):
        if api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            api = client.AppsV1Api()
        self.api, self.namespace, self.statefulsets = api, namespace, statefulsets

    def start(self) -> None:
        """Nothing runs beside the router: Kubernetes restarts pods."""

    async def replicas(self, pool: str) -> int:
        scale = await asyncio.to_thread(self.api.read_namespaced_stateful_set_scale, self.statefulsets[pool],
                                        self.namespace)
        return int(scale.spec.replicas)

    async def scale(self, pool: str, replicas: int) -> None:
        await asyncio.to_thread(self.api.patch_namespaced_stateful_set_scale, self.statefulsets[pool],
                                self.namespace, {"spec": {"replicas": replicas}})


def advise(pool: WorkerPool, telemetry: Telemetry, ttft_slo_s: float, itl_slo_s: float,
           target_kv_use: float = 0.8) -> dict[str, dict]:
    """How many workers each pool needs for the load of the last minute, and why."""
    recent = telemetry.recent(60.0)
    out = {}
    for role in POOLS:
        workers = pool.pool(role)
        current = len(workers)
        reasons: list[str] = []
        need = float(current)
        loads = [w.load for w in workers if w.load is not None]
        if role == "decode" and loads:
            kv = sum(1 - ld.free_blocks / max(1, ld.total_blocks) for ld in loads) / len(loads)
            waiting = sum(ld.waiting for ld in loads)
            if kv > target_kv_use:
                need = max(need, current * kv / target_kv_use)
                reasons.append(f"KV cache {kv:.0%} used (target {target_kv_use:.0%})")
            if waiting:
                running = max(1, sum(ld.running for ld in loads))
                need = max(need, current * (running + waiting) / running)
                reasons.append(f"{waiting} requests waiting for a decode slot")
            itl = recent["itl_p99_s"]
            if itl is not None and itl > itl_slo_s:
                need = max(need, current * itl / itl_slo_s)
                reasons.append(f"ITL p99 {itl * 1000:.0f} ms over the {itl_slo_s * 1000:.0f} ms SLO")
            if not reasons and current > 1 and kv < target_kv_use / 3 and (itl or 0) < itl_slo_s / 3:
                need = current - 1
                reasons.append(f"KV cache {kv:.0%} used and ITL well under its SLO: one fewer would do")
        if role == "prefill" and workers:
            queued = sum(w.inflight_tokens for w in workers)
            predicted = pool.predicted_ttft_s(queued)
            ttft = recent["ttft_p99_s"]
            if ttft is not None and ttft > ttft_slo_s:
                need = max(need, current * ttft / ttft_slo_s)
                reasons.append(f"TTFT p99 {ttft:.2f} s over the {ttft_slo_s:g} s SLO")
            if predicted is not None and predicted > ttft_slo_s:
                need = max(need, current * predicted / ttft_slo_s)
                reasons.append(f"{queued} prompt tokens queued: {predicted:.1f} s to clear")
            if not reasons and current > 1 and (ttft or 0) < ttft_slo_s / 3 and queued == 0:
                need = current - 1
                reasons.append("TTFT well under its SLO and nothing queued: one fewer would do")
        recommended = max(1 if current else 0, math.ceil(need - 1e-9))
        out[role] = {"current": current, "recommended": recommended,
                     "reasons": reasons or ["load is within the SLOs"]}
    return out
