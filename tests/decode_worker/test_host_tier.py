"""A worker started with --kv-host-bytes (issue 35): a conversation whose prefix was pushed out of its KV pool by
other traffic comes back from the host tier, the same answer as the first time, and the worker's /load and
the router's /metrics say how much the tier holds and served."""

import httpx
import pytest

from bench.cluster import LocalCluster, wait_until

POOL_BYTES = 24 * 30 * 2 * 16 * 3 * 64 * 4  # 24 blocks of the demo model's KV (float32 on the CPU)


@pytest.fixture(scope="module")
def cluster(demo_gguf):
    c = LocalCluster(str(demo_gguf), prefill=0, decode=1, kv_cache_bytes=POOL_BYTES,
                     worker_args=("--kv-host-bytes", str(8 * POOL_BYTES)))
    c.router = c.start_router()
    yield c
    c.close()


def _ask(c, model: str, topic: str) -> str:
    text = f"Here is a long note about {topic}, written to fill several blocks of the cache. " * 5
    r = httpx.post(f"{c.router}/v1/chat/completions", timeout=60, json={
        "model": model, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "system", "content": text}, {"role": "user", "content": "Summarise it."}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_a_prefix_pushed_out_of_the_pool_comes_back_from_the_host_tier(cluster, demo_model_name):
    c = cluster
    worker = c.decode_urls[0]
    first = _ask(c, demo_model_name, "lighthouses")
    for topic in ("volcanoes", "violins", "winter gardens", "trains"):
        _ask(c, demo_model_name, topic)
    before = c.load(worker)
    assert before["host_blocks"] > 0 and before["host_blocks_total"] > before["host_blocks"]
    assert _ask(c, demo_model_name, "lighthouses") == first
    after = c.load(worker)
    assert after["host_hit_tokens"] - before["host_hit_tokens"] >= 5 * 16  # its system prompt, from the tier
    series = f'pdserve_worker_kv_hit_tokens{{role="decode",tier="host",worker="{worker}"}}'

    def exported() -> float | None:  # the router's copy of the worker's load, refreshed on its poll
        metrics = httpx.get(f"{c.router}/metrics", timeout=10).text
        return next((float(x.split()[-1]) for x in metrics.splitlines() if x.startswith(series + " ")), None)

    wait_until(lambda: exported() == after["host_hit_tokens"], 10, "the router's metric to show the tier's hits", 0.2)
