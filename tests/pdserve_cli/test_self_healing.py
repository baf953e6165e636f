"""Workers come back (`pdserve serve`): the decode worker's engine process is killed; the cluster restarts the
worker on its URL, the router sees a new instance there (its prefix-index entries dropped, the restart on the
admin API and dashboard), and answers again, the same greedy answer as before."""

import subprocess
import time

import httpx
import psutil
import pytest

from tests.helpers import embedded_cluster

ADMIN = "heal-admin-token"


@pytest.fixture(scope="module")
def embedded(demo_gguf):
    with embedded_cluster("--admin-token", ADMIN) as (url, proc):
        yield url, demo_gguf.stem, proc


def _decode_pool(url: str) -> dict:
    return httpx.get(f"{url}/admin/pools/decode", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10).json()


def _ask(url: str, model: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": model, "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _decode_engine_process(cluster: subprocess.Popen) -> psutil.Process:
    """The Ray actor process that runs the decode worker's engine core: the parent of its frontend."""
    for p in psutil.Process(cluster.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "decode_worker" in cmd and "--ipc-fd" in cmd:
            return p.parent()
    raise AssertionError("no decode worker frontend process found")


def test_a_killed_decode_worker_comes_back_and_serves(embedded):
    url, model, cluster = embedded
    before = _ask(url, model)
    worker_url = _decode_pool(url)["workers"][0]["url"]
    engine = _decode_engine_process(cluster)
    engine.kill()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pool = _decode_pool(url)
        w = pool["workers"][0]
        if w["restarts"] >= 1 and w["healthy"] and w["name"] is not None:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the decode worker did not come back: {pool}")
    assert w["url"] == worker_url and pool["healthy"] == 1
    assert _decode_engine_process(cluster).pid != engine.pid
    assert _ask(url, model) == before
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
