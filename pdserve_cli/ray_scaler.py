"""The embedded cluster's scaling back end: worker actors in the local Ray instance.

Growing a pool starts an actor and adds its URL to the router's worker list once it serves. Shrinking one
drains the newest worker first: the router stops sending it requests, waits until what it has in flight
has finished (its KV is freed as each request ends), then stops the actor.

Workers come back: a worker the router has seen unhealthy for `dead_after_s` (its process died, a rank of its
group died, it stopped answering) is restarted, the whole group, on the same URL (`WorkerGroup.restart`);
the router sees a new instance there (router/workers.py) and drops what it knew of the old one. Each worker's
restart runs on its own (one worker waiting out a backoff delays no other). A worker that keeps dying is
restarted after a backoff: from its third death in a row within `stable_s` of coming back, 1 s, doubling with
each further one up to 60 s (a worker killed now and then comes back at once; one that crashes as it starts
does not spin); each restart says why in the log.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from router.discovery import StaticDiscovery
from router.scaling import POOLS

log = logging.getLogger("pdserve")


class RayScaler:
    def __init__(self, start: Callable[[str], tuple[str, Any]], stop: Callable[[Any], None],
                 members: dict[str, list[tuple[str, Any]]], discovery: StaticDiscovery, pool,
                 drain_timeout_s: float = 120.0, restart: Callable[[Any], str] | None = None,
                 dead_after_s: float = 5.0, stable_s: float = 60.0, max_backoff_s: float = 60.0,
                 backoff_base_s: float = 1.0, fixed: list[tuple[str, str, Any]] = ()):
        """fixed: (role, url, group) of workers restarted when they die but never scaled (another model's)."""
        self.start_worker, self.stop = start, stop  # blocking: run in threads
        self.restart = restart  # group -> its URL once it serves again (blocking); None: no restarts
        self.members = members  # role -> [(url, actor)], oldest first
        self.fixed = list(fixed)
        self.discovery, self.pool = discovery, pool
        self.drain_timeout_s = drain_timeout_s
        self.dead_after_s, self.stable_s, self.max_backoff_s = dead_after_s, stable_s, max_backoff_s
        self.backoff_base_s = backoff_base_s
        self.desired = {role: len(members.get(role, [])) for role in POOLS}
        self._down_since: dict[str, float] = {}  # url -> when the router first saw it unhealthy
        self._quick_deaths: dict[str, tuple[int, float]] = {}  # url -> (restarts in a row that did not last, last)
        self._restarting: dict[str, asyncio.Task] = {}  # url -> its restart, under way
        self._task: asyncio.Task | None = None
        self._supervisor: asyncio.Task | None = None

    def start(self) -> None:
        if self.restart is not None and self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self, interval_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            watched = [(role, url, group) for role in POOLS for url, group in self.members[role]] + self.fixed
            for role, url, group in watched:
                w = self.pool.find(url)
                if url in self._restarting:
                    continue
                if w is None or w.draining or w.healthy:
                    self._down_since.pop(url, None)
                    continue
                down = now - self._down_since.setdefault(url, now)
                if down >= self.dead_after_s:
                    task = self._restarting[url] = asyncio.create_task(self._restart(role, url, group, down))
                    task.add_done_callback(lambda _, u=url: self._restarting.pop(u, None))

    def backoff_s(self, quick: int) -> float:
        """The wait before the restart of a worker that died `quick` times in a row within stable_s."""
        return 0.0 if quick < 3 else min(self.max_backoff_s, self.backoff_base_s * 2.0 ** (quick - 3))

    async def _restart(self, role: str, url: str, group: Any, down_s: float) -> None:
        quick, last = self._quick_deaths.get(url, (0, 0.0))
        quick = quick + 1 if last and time.monotonic() - last < self.stable_s else 1
        backoff = self.backoff_s(quick)
        log.error("%s worker %s has been unhealthy for %.1f s: restarting it%s", role, url, down_s,
                  f" after {backoff:.0f} s (restart {quick} in a row within {self.stable_s:.0f} s of the last)"
                  if backoff else "")
        await asyncio.sleep(backoff)
        try:
            await asyncio.to_thread(self.restart, group)
        except Exception as e:  # it may come up on a later try
            log.error("restarting %s worker %s failed: %r", role, url, e)
        self._quick_deaths[url] = (quick, time.monotonic())
        self._down_since.pop(url, None)
        await self.pool.sync()

    async def replicas(self, pool: str) -> int:
        return self.desired[pool]

    async def scale(self, pool: str, replicas: int) -> None:
        self.desired[pool] = replicas
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._reconcile())

    async def _reconcile(self) -> None:
        while True:
            role = next((r for r in POOLS if len(self.members[r]) != self.desired[r]), None)
            if role is None:
                return
            members = self.members[role]
            try:
                if len(members) < self.desired[role]:
                    url, actor = await asyncio.to_thread(self.start_worker, role)
                    members.append((url, actor))
                    self.discovery.add(role, url)
                    await self.pool.sync()  # in the router at once, not at its next poll
                    log.info("started %s worker %s", role, url)
                else:
                    url, actor = members.pop()
                    await self._drain(url)
                    self.discovery.remove(role, url)
                    await self.pool.sync()  # out of the router before its actor goes away
                    await asyncio.to_thread(self.stop, actor)
                    log.info("stopped %s worker %s after draining it", role, url)
            except Exception as e:  # a worker that fails to start: give up on this change, say why
                log.error("scaling the %s pool failed: %r", role, e)
                self.desired[role] = len(members)

    async def _drain(self, url: str) -> None:
        w = self.pool.find(url)
        if w is None:
            return
        w.draining = True  # no new requests from now on
        deadline = time.monotonic() + self.drain_timeout_s
        while time.monotonic() < deadline:
            busy = w.inflight or (w.load is not None and w.load.running + w.load.waiting > 0)
            if not busy:
                return
            await asyncio.sleep(0.1)
        log.warning("worker %s still busy after %.0f s of draining; stopping it anyway", url, self.drain_timeout_s)
