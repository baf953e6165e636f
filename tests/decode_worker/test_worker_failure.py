"""A worker that dies (the whole worker, both its processes): a stream it was decoding goes on from the decode
worker left, token-exact (migrated); a request whose prefill worker died is retried before its first token;
and the cluster keeps serving with the workers that are left."""

import json
import time

import httpx
import pytest

from bench.cluster import LocalCluster


@pytest.fixture(scope="module")
def small_cluster(demo_gguf):
    c = LocalCluster(str(demo_gguf), prefill=1, decode=2)
    c.router = c.start_router("--local-prefill-tokens", "0")
    yield c
    c.close()


def _chat(model: str, content: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def _wait_unhealthy(router: str, url: str) -> None:
    for _ in range(50):
        workers = httpx.get(f"{router}/health", timeout=5).json()["workers"]
        if not next(w for w in workers if w["url"] == url)["healthy"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} still healthy")


def _streamed(events: list[str]) -> str:
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    assert not any("error" in c for c in chunks), chunks[-1]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def test_a_stream_whose_decode_worker_is_killed_goes_on_from_the_other(small_cluster, demo_model_name):
    c = small_cluster
    body = _chat(demo_model_name, "Count from one to two hundred in words.", max_tokens=80, ignore_eos=True,
                 stream=True)
    with httpx.stream("POST", f"{c.router}/v1/chat/completions", json=body, timeout=60) as resp:
        undisturbed = _streamed([line[6:] for line in resp.iter_lines() if line.startswith("data: ")])
    events = []
    with httpx.stream("POST", f"{c.router}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 4:
                    break
        busy = [u for u in c.decode_urls if c.load(u)["running"] > 0]
        assert len(busy) == 1
        c.kill_worker(busy[0])
        events += [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert _streamed(events) == undisturbed
    _wait_unhealthy(c.router, busy[0])
    # The cluster keeps serving on the decode worker that is left.
    r = httpx.post(f"{c.router}/v1/chat/completions", json=_chat(demo_model_name, "Say hello.", max_tokens=8),
                   timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_dead_prefill_worker_is_retried_without_the_client_noticing(small_cluster, demo_model_name):
    c = small_cluster
    c.kill_worker(c.prefill_urls[0])
    body = _chat(demo_model_name, "Name the four seasons of the year and one thing about each of them.",
                 max_tokens=12)
    r = httpx.post(f"{c.router}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
