"""Soak: thousands of requests through the front door (API key, Redis) to real workers, a fifth of the
clients leaving at a random moment. Afterwards every worker's KV blocks are free again and every request
sent is on the key's bill exactly once."""

import asyncio
import os
import random
import time
import uuid

import httpx
import pytest

from tests.router.conftest import REDIS_URL, require_redis

pytestmark = pytest.mark.slow
ADMIN = "soak-admin"
REQUESTS = int(os.environ.get("PDSERVE_SOAK_REQUESTS", "2000"))


def _settled(cluster, baseline: dict[str, int]) -> bool:
    for url in cluster.prefill_urls + cluster.decode_urls:
        load = cluster.load(url)
        if load["running"] or load["waiting"] or load["free_blocks"] != baseline[url]:
            return False
    return True


def test_soak_with_random_disconnects_leaks_no_blocks_and_bills_every_request(cluster, demo_model_name):
    require_redis()
    ns = f"pdserve-soak-{uuid.uuid4().hex}"
    router = cluster.start_router("--auth", "--admin-token", ADMIN, "--redis-url", REDIS_URL, "--redis-namespace", ns,
                                  "--local-prefill-tokens", "32")
    admin = {"authorization": f"Bearer {ADMIN}"}
    created = httpx.post(f"{router}/admin/keys", json={"name": "soak"}, headers=admin, timeout=10).json()
    baseline = {u: cluster.load(u)["total_blocks"] for u in cluster.prefill_urls + cluster.decode_urls}
    rng = random.Random(0)
    topics = ["the sea", "a city at night", "mountains", "a library", "the first snow", "an old clock"]
    left = 0

    async def one(client: httpx.AsyncClient, i: int) -> str:
        nonlocal left
        # Shared system prompts (prefix-cache hits), and every 5th prompt long enough for the prefill worker.
        system = f"You write about {topics[i % len(topics)]}." + (" Be vivid and precise." * 12 if i % 5 == 0 else "")
        body = {"model": demo_model_name, "max_tokens": rng.choice([1, 2, 4, 8]), "temperature": 0.7,
                "seed": i, "stream": rng.random() < 0.5,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Line {i}."}]}
        leave = rng.random() < 0.2
        timeout = rng.uniform(0.001, 0.3) if leave else 120
        try:
            async with client.stream("POST", f"{router}/v1/chat/completions", json=body, timeout=timeout,
                                     headers={"authorization": f"Bearer {created['key']}"}) as r:
                await r.aread()
                return str(r.status_code)
        except httpx.TimeoutException:
            left += 1
            return "left"

    async def soak() -> list[str]:
        sem = asyncio.Semaphore(48)
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
            async def bounded(i: int) -> str:
                async with sem:
                    return await one(client, i)

            return await asyncio.gather(*(bounded(i) for i in range(REQUESTS)))

    start = time.monotonic()
    outcomes = asyncio.run(soak())
    elapsed = time.monotonic() - start
    assert set(outcomes) <= {"200", "left"}, {o for o in outcomes if o not in ("200", "left")}
    deadline = time.monotonic() + 30
    while not _settled(cluster, baseline) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _settled(cluster, baseline), [cluster.load(u) for u in cluster.prefill_urls + cluster.decode_urls]
    def received() -> float:  # what reached the router, by its own count: a client that gave up while
        text = httpx.get(f"{router}/metrics").text  # connecting never got there
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("pdserve_requests_total{"))

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # settling is asynchronous: wait until the books close
        rows = httpx.get(f"{router}/admin/usage", params={"key_id": created["id"]}, headers=admin).json()["data"]
        billed, arrived = sum(r["requests"] for r in rows), received()
        if billed == arrived:
            break
        time.sleep(0.2)
    cancelled = sum(r["cancelled"] for r in rows)
    print(f"soak: {REQUESTS} requests in {elapsed:.1f} s, {left} clients left, {arrived:.0f} reached the router, "
          f"{billed} billed, {cancelled} as cancelled")
    assert REQUESTS - left <= arrived <= REQUESTS
    assert billed == arrived  # every request that arrived billed once: done, streamed or cut off
    assert 0 < cancelled <= left and sum(r["errors"] for r in rows) == 0
