"""Workers' internal API answers only callers holding the cluster's internal token; a router without it
cannot register them; with it the whole disaggregated path works (router -> decode -> prefill /send)."""

import httpx
import pytest
from openai import OpenAI

from protocol.stream_client import StreamClient
from router.discovery import StaticDiscovery
from router.state import LocalState
from router.workers import WorkerPool

TOKEN = "internal-test-token-0123456789"


@pytest.fixture(scope="module")
def guarded(demo_gguf):
    from bench.cluster import LocalCluster

    c = LocalCluster(str(demo_gguf), prefill=1, decode=1, worker_args=("--internal-token", TOKEN))
    yield c
    c.close()


def test_internal_api_needs_the_token_and_probes_stay_open(guarded):
    for url in guarded.prefill_urls + guarded.decode_urls:
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.get(f"{url}/info")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_internal_token"
        assert httpx.get(f"{url}/info", headers={"x-pdserve-token": "wrong"}).status_code == 401
        assert httpx.get(f"{url}/info", headers={"x-pdserve-token": TOKEN}).status_code == 200
    r = httpx.post(f"{guarded.decode_urls[0]}/generate", json={"request_id": "x", "prompt_token_ids": [1, 2],
                                                               "params": {"max_tokens": 1}})
    assert r.status_code == 401


async def test_a_router_without_the_token_cannot_register_the_workers(guarded):
    for client, healthy in ((StreamClient(), False), (StreamClient(headers={"x-pdserve-token": TOKEN}), True)):
        pool = WorkerPool(StaticDiscovery([], guarded.decode_urls), client, LocalState(1000))
        await pool.sync()
        await pool._refresh(pool.workers[0])
        assert pool.workers[0].healthy is healthy and (pool.workers[0].info is not None) is healthy
        await client.close()


def test_router_with_the_token_serves_through_both_workers(guarded, demo_model_name):
    router = guarded.start_router("--internal-token", TOKEN, "--local-prefill-tokens", "0")
    before = guarded.load(guarded.prefill_urls[0])["tokens_computed"]
    r = OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0).chat.completions.create(
        model=demo_model_name, messages=[{"role": "user", "content": "Say hello to the internal token."}],
        max_tokens=8, temperature=0)
    assert r.usage.completion_tokens == 8
    assert guarded.load(guarded.prefill_urls[0])["tokens_computed"] > before  # /send went through with the token
