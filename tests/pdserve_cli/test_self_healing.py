"""Workers come back and streams survive (`pdserve serve`, two decode workers): a decode worker's engine process
is killed; the cluster restarts the worker on its URL, the router sees a new instance there (its prefix-index
entries dropped, the restart on the admin API and dashboard), and answers again, the same greedy answer as
before. A stream whose decode worker is killed mid-answer goes on from the other one: the client sees no error
and the same text as an undisturbed run."""

import time

import httpx
import pytest

from bench.cluster import embedded_cluster, worker_processes
from tests.helpers import stream_chat

ADMIN = "heal-admin-token"


@pytest.fixture(scope="module")
def embedded(demo_gguf):
    with embedded_cluster("--admin-token", ADMIN, "--decode-workers", "2") as (url, proc):
        yield url, demo_gguf.stem, proc


def _decode_pool(url: str) -> dict:
    return httpx.get(f"{url}/admin/pools/decode", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10).json()


def _ask(url: str, model: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": model, "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _wait_for_full_pool(url: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pool = _decode_pool(url)
        if pool["healthy"] == 2 and all(w["name"] is not None for w in pool["workers"]):
            return pool
        time.sleep(0.5)
    raise AssertionError(f"the decode pool is not whole: {pool}")


def test_a_killed_decode_worker_comes_back_and_serves(embedded):
    url, model, cluster = embedded
    _wait_for_full_pool(url)
    before = _ask(url, model)
    w = _decode_pool(url)["workers"][0]
    worker_url, restarts = w["url"], w["restarts"]
    engine, _ = worker_processes(cluster, worker_url)
    engine.kill()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pool = _decode_pool(url)
        w = next(w for w in pool["workers"] if w["url"] == worker_url)
        if w["restarts"] > restarts and w["healthy"] and w["name"] is not None:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the decode worker did not come back: {pool}")
    assert pool["healthy"] == 2
    assert worker_processes(cluster, worker_url)[0].pid != engine.pid
    assert _ask(url, model) == before
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def _stream(url: str, model: str, on_chunk=lambda n: None) -> tuple[str, list[dict]]:
    body = {"model": model, "max_tokens": 96, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]}
    return stream_chat(url, body, timeout=120, on_event=on_chunk)


def _migrations(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("pdserve_migrations_total "):
            return float(line.split()[-1])
    raise AssertionError("no pdserve_migrations_total in /metrics")


def test_a_stream_goes_on_when_its_decode_worker_is_killed(embedded):
    url, model, cluster = embedded
    _wait_for_full_pool(url)
    undisturbed, _ = _stream(url, model)
    migrated = _migrations(url)
    killed = []

    def kill_its_worker(n: int) -> None:
        if n == 12 and not killed:  # a dozen tokens in: the engine serving the stream goes
            busy = [w for w in _decode_pool(url)["workers"] if w["inflight"]]
            assert len(busy) == 1, busy
            engine, _ = worker_processes(cluster, busy[0]["url"])
            engine.kill()
            killed.append(busy[0]["url"])

    text, events = _stream(url, model, kill_its_worker)
    assert killed
    assert not any("error" in e for e in events), [e for e in events if "error" in e]
    assert text == undisturbed
    assert events[-1]["usage"]["completion_tokens"] == 96  # the tokens of both workers, counted once
    assert _migrations(url) == migrated + 1
