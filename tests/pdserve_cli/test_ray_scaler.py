"""The embedded cluster's supervisor (pdserve_cli/ray_scaler.py) without Ray: a dead worker is restarted after
dead_after_s, each on its own (one waiting out a backoff delays no other), and the backoff starts at the third
death in a row within stable_s and doubles from there."""

import asyncio
import time
from dataclasses import dataclass

from pdserve_cli.ray_scaler import RayScaler
from router.discovery import StaticDiscovery


@dataclass
class FakeWorker:
    url: str
    healthy: bool = True
    draining: bool = False


class FakePool:
    def __init__(self, urls: list[str]):
        self.workers = {u: FakeWorker(u) for u in urls}

    def find(self, url: str) -> FakeWorker:
        return self.workers[url]

    async def sync(self) -> None:
        pass


def _scaler(pool: FakePool, restarted: list, **kw) -> RayScaler:
    def restart(group: str) -> str:
        restarted.append((group, time.monotonic()))
        pool.workers[group].healthy = True
        return group

    members = {"prefill": [], "decode": [(u, u) for u in pool.workers]}
    return RayScaler(lambda role: None, lambda g: None, members, StaticDiscovery([], list(pool.workers)), pool,
                     restart=restart, dead_after_s=0.05, **kw)


def test_the_backoff_starts_at_the_third_quick_death_and_doubles():
    s = _scaler(FakePool([]), [], backoff_base_s=1.0, max_backoff_s=60.0)
    assert [s.backoff_s(q) for q in range(1, 11)] == [0, 0, 1, 2, 4, 8, 16, 32, 60, 60]


async def test_a_worker_in_backoff_does_not_delay_another_ones_restart():
    pool = FakePool(["a", "b"])
    restarted: list = []
    s = _scaler(pool, restarted, backoff_base_s=2.0)
    s._quick_deaths["a"] = (4, time.monotonic())  # its next death is the fifth in a row: 2 x 4 s of backoff
    supervisor = asyncio.create_task(s._supervise(interval_s=0.01))
    try:
        t0 = time.monotonic()
        pool.workers["a"].healthy = False
        await asyncio.sleep(0.2)
        pool.workers["b"].healthy = False
        while not any(g == "b" for g, _ in restarted):
            assert time.monotonic() - t0 < 3, "b waited for a's backoff"
            await asyncio.sleep(0.01)
        assert not any(g == "a" for g, _ in restarted)  # a is still waiting out its backoff
        assert "a" in s._restarting and pool.workers["b"].healthy
    finally:
        supervisor.cancel()
        for task in list(s._restarting.values()):
            task.cancel()
