"""Chaos: a steady load of greedy streaming chats on an embedded cluster (`pdserve serve`: 2 prefill + 2 decode
workers, the demo model) while a random worker is killed every T seconds; JSON lines.

Each kill takes a worker whose pool is whole (so one worker of each pool is alive at all times): its engine core
(the Ray actor) or its frontend process, at random. The cluster restarts it; streams it was serving move to
the other decode worker (router/dispatch.py). Every request's text is compared with an undisturbed run of the
same request (the same prompts before the kills, on the same cluster); with --control the same load without
kills runs first, and the share of its outputs equal to the undisturbed run (less three standard errors; nothing
when it is 100%) is the bar instead of 100%: a GPU's bf16 matmuls may round a row differently in batches of
other sizes, so greedy near-ties can flip with no kill at all. Issue 33's bars, checked at the end (exit 1 if
one is missed): 0 client-visible errors, 100% token-exact outputs, KV blocks in use back to what
they were before the load, and a killed worker back in its pool within 30 s (60 s with --quick, on CI's CPU).

  python -m bench.chaos                         # 5 minutes, a kill every 20 s
  python -m bench.chaos --quick                 # CI: 40 s, a kill every 15 s
  python -m bench.chaos --quick --control --transport nixl --load-format dummy --model DIR   # GPU: NIXL
"""

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time

import httpx

from bench.cluster import embedded_cluster, wait_until, worker_processes
from bench.common import emit

ADMIN = "chaos-admin-token"
RECOVERY_BAR_S = 30.0  # issue 33's bar
# --quick runs in CI on a 2-core machine shared with the rest of the suite (./dev test runs two workers): six
# processes restarting there is slower than on a GPU node, so the quick bar is looser; a worker that never
# comes back still fails it.
QUICK_RECOVERY_BAR_S = 60.0
TOPICS = ["a lighthouse", "the moon", "bread", "a river", "chess", "a violin", "winter", "bees", "a library",
          "volcanoes", "the ocean", "a clock", "trains", "gardens", "a desert", "owls"]


def _admin(url: str, path: str) -> dict:
    return httpx.get(f"{url}/admin/{path}", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10).json()


def _pools(url: str) -> list[dict]:
    return [_admin(url, f"pools/{role}") for role in ("prefill", "decode")]


def _whole(pool: dict) -> bool:
    return pool["healthy"] == pool["replicas"] and all(w["name"] is not None for w in pool["workers"])


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def _chat(client: httpx.AsyncClient, url: str, model: str, topic: str, max_tokens: int) -> tuple[str, str | None]:
    """(text, error): the streamed text, and what the client saw go wrong (None: nothing)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Write a short poem about {topic}."}]}
    text = []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return "", f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return "".join(text), f"error event: {event['error']}"
                text += [c["delta"].get("content") or "" for c in event.get("choices", [])]
    except httpx.HTTPError as e:
        return "".join(text), f"{type(e).__name__}: {e}"
    return "".join(text), None


async def _load(url: str, model: str, topics: list[str], concurrency: int, max_tokens: int, until: float | None
                ) -> list[tuple[str, str, str | None]]:
    """(topic, text, error) for each request: every topic once (until None), or round and round until then."""
    results = []
    queue = list(topics)

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        n = i
        while True:
            if until is None:
                if not queue:
                    return
                topic = queue.pop()
            else:
                if time.monotonic() >= until:
                    return
                topic = topics[n % len(topics)]
                n += concurrency
            text, error = await _chat(client, url, model, topic, max_tokens)
            results.append((topic, text, error))

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(concurrency)))
    return results


async def _killer(url: str, cluster, every_s: float, until: float, rng: random.Random, kills: list[dict],
                  watchers: list[asyncio.Task]) -> None:
    """Every every_s, kill a random worker of a whole pool; a watcher times its return to the pool."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every_s)
        if time.monotonic() >= until:
            return
        pools = await loop.run_in_executor(None, _pools, url)
        candidates = [w for p in pools if _whole(p) and p["replicas"] > 1 for w in p["workers"]]
        if not candidates:
            continue
        victim = rng.choice(candidates)
        which = rng.choice(["engine core", "frontend"])
        core, frontend = worker_processes(cluster, victim["url"])
        (core if which == "engine core" else frontend).kill()
        kill = {"worker": victim["url"], "role": victim["role"], "process": which, "at": time.monotonic(),
                "restarts": victim["restarts"], "recovered_s": None}
        kills.append(kill)
        print(f"chaos: killed the {which} of {victim['role']} worker {victim['url']}", file=sys.stderr, flush=True)
        watchers.append(asyncio.ensure_future(_watch_recovery(url, kill)))


async def _watch_recovery(url: str, kill: dict, timeout_s: float = 180.0) -> None:
    loop = asyncio.get_running_loop()
    while time.monotonic() - kill["at"] < timeout_s:
        pool = await loop.run_in_executor(None, _admin, url, f"pools/{kill['role']}")
        w = next((w for w in pool["workers"] if w["url"] == kill["worker"]), None)
        if w is not None and w["restarts"] > kill["restarts"] and w["healthy"] and w["name"] is not None:
            kill["recovered_s"] = time.monotonic() - kill["at"]
            return
        await asyncio.sleep(0.25)


def _control_bar(exact: int, runs: int, n: int) -> float:
    """The exact share a chaos run of n requests must reach given a control run's exact/runs: the control's
    share less three standard errors of the difference of two shares (which requests meet a near-tie is a
    draw); nothing excused when the control was exact."""
    p = exact / max(1, runs)
    return p - 3 * math.sqrt(p * (1 - p) * (1 / max(1, runs) + 1 / max(1, n)))


def _kv_used(url: str) -> int:
    return sum(w["kv_used"] or 0 for p in _pools(url) for w in p["workers"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI: 40 s of load, a kill every 15 s")
    ap.add_argument("--seconds", type=float, default=None, help="how long the load runs (default 300; quick 40)")
    ap.add_argument("--kill-every", type=float, default=None, help="seconds between kills (default 20; quick 15)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens an answer (default 64; quick 32)")
    ap.add_argument("--model", default=None, help="default: the demo model")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    ap.add_argument("--transport", default="host", choices=["host", "nixl"], help="the workers' KV transport")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", action="store_true",
                    help="first the same load without kills: the share of its outputs equal to the undisturbed "
                         "run is the exactness bar (on a GPU, bf16 batches of other sizes may round differently)")
    a = ap.parse_args()
    seconds = a.seconds or (40.0 if a.quick else 300.0)
    max_tokens = a.max_tokens or (32 if a.quick else 64)
    kill_every = a.kill_every or (15.0 if a.quick else 20.0)
    recovery_bar = QUICK_RECOVERY_BAR_S if a.quick else RECOVERY_BAR_S
    flags = ["--prefill-workers", "2", "--decode-workers", "2", "--admin-token", ADMIN,
             "--local-prefill-tokens", "0"]  # every prompt through a prefill worker: the handshake is in play
    if a.model:
        flags += ["--model", a.model]
    flags += ["--load-format", a.load_format, "--transport", a.transport]
    with embedded_cluster(*flags) as (url, cluster):
        wait_until(lambda: all(_whole(p) for p in _pools(url)), 180, "all four workers", 0.5)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        # The undisturbed run: every prompt once, the same concurrency, no kills.
        reference = asyncio.run(_load(url, model, TOPICS, a.concurrency, max_tokens, None))
        bad = [r for r in reference if r[2] is not None]
        if bad:
            raise SystemExit(f"the undisturbed run failed: {bad[:3]}")
        expected = {topic: text for topic, text, _ in reference}
        wait_until(lambda: _kv_used(url) == 0, 30, "the undisturbed run's blocks to be freed", 0.5)
        control = None
        if a.control:
            runs = asyncio.run(_load(url, model, TOPICS, a.concurrency, max_tokens, time.monotonic() + seconds))
            control = (sum(1 for topic, text, error in runs if error is None and text == expected[topic]), len(runs))
            wait_until(lambda: _kv_used(url) == 0, 30, "the control run's blocks to be freed", 0.5)
        kv_before = _kv_used(url)
        migrations_before = _metric(url, "pdserve_migrations_total")
        kills: list[dict] = []

        async def chaos() -> list:
            until = time.monotonic() + seconds
            watchers: list[asyncio.Task] = []
            killer = asyncio.ensure_future(_killer(url, cluster, kill_every, until, random.Random(a.seed), kills,
                                                   watchers))
            try:
                return await _load(url, model, TOPICS, a.concurrency, max_tokens, until)
            finally:
                killer.cancel()
                await asyncio.gather(*watchers)  # every killed worker back (or given up on after 180 s)

        results = asyncio.run(chaos())
        # After the load: the blocks of every request freed.
        with contextlib.suppress(TimeoutError):  # what is still held then is reported
            wait_until(lambda: _kv_used(url) == kv_before, 30, "the blocks to be freed", 0.5)
        kv_after = _kv_used(url)
        migrations = _metric(url, "pdserve_migrations_total") - migrations_before
    errors = [r for r in results if r[2] is not None]
    exact = sum(1 for topic, text, error in results if error is None and text == expected[topic])
    worst = max((k["recovered_s"] or float("inf") for k in kills), default=0.0)
    emit("chaos", "token_exact_outputs", exact, "requests", baseline="requests completed",
         baseline_value=len(results), kills=len(kills), seconds=seconds, concurrency=a.concurrency)
    if control is not None:
        emit("chaos", "token_exact_share", exact / max(1, len(results)), "share", baseline="the same load, no kills",
             baseline_value=control[0] / max(1, control[1]), control_requests=control[1])
    emit("chaos", "client_visible_errors", len(errors), "requests", baseline="requests completed",
         baseline_value=len(results), first_errors=[e[2] for e in errors[:3]])
    emit("chaos", "streams_migrated", migrations, "streams", baseline="kills", baseline_value=len(kills) or None,
         kills=[{k: v for k, v in kill.items() if k != "at"} for kill in kills])
    emit("chaos", "kv_blocks_in_use_after", kv_after, "blocks", baseline="before the load",
         baseline_value=kv_before or None)
    emit("chaos", "worst_recovery_s", worst, "s", baseline="the recovery bar", baseline_value=recovery_bar,
         recoveries_s=[k["recovered_s"] and round(k["recovered_s"], 2) for k in kills])
    missed = []
    if errors:
        missed.append(f"{len(errors)} client-visible errors")
    exact_bar = 1.0 if control is None else _control_bar(*control, len(results))
    if exact < exact_bar * len(results):
        diffs = [(t, x[:60], expected[t][:60]) for t, x, e in results if e is None and x != expected[t]][:2]
        missed.append(f"{len(results) - exact} outputs not token-exact: {diffs}")
    if kv_after != kv_before:
        missed.append(f"{kv_after} KV blocks in use after the load, {kv_before} before")
    if worst > recovery_bar:
        missed.append(f"a worker took {worst:.1f} s to come back (bar: {recovery_bar:g} s)")
    if not kills:
        missed.append("no worker was killed (the pools were never whole)")
    if missed:
        raise SystemExit("chaos: bars missed: " + "; ".join(missed))


if __name__ == "__main__":
    main()
