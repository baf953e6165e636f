"""The embedded cluster's scaling back end: worker actors in the local Ray instance.

Growing a pool starts an actor and adds its URL to the router's worker list once it serves. Shrinking one
drains the newest worker first: the router stops sending it requests, waits until what it has in flight
has finished (its KV is freed as each request ends), then stops the actor.
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
                 drain_timeout_s: float = 120.0):
        self.start, self.stop = start, stop  # blocking: run in threads
        self.members = members  # role -> [(url, actor)], oldest first
        self.discovery, self.pool = discovery, pool
        self.drain_timeout_s = drain_timeout_s
        self.desired = {role: len(members.get(role, [])) for role in POOLS}
        self._task: asyncio.Task | None = None

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
                    url, actor = await asyncio.to_thread(self.start, role)
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
