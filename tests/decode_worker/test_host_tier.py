"""A worker started with --kv-host-bytes (issue 35): a conversation whose prefix was pushed out of its KV pool by
other traffic comes back from the host tier, the same answer as the first time, and the worker's /load and
the router's /metrics say how much the tier holds and served."""

import httpx
import pytest

from bench.cluster import LocalCluster

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
    metrics = httpx.get(f"{c.router}/metrics", timeout=10).text
    line = next(x for x in metrics.splitlines()
                if x.startswith(f'pdserve_worker_kv_hit_tokens{{role="decode",tier="host",worker="{worker}"}}'))
    assert float(line.split()[-1]) == after["host_hit_tokens"]
