"""The router under a plain ASGI server (uvicorn) answers its generation endpoints through the same function
as its own server: a slow request gets 504 (not 503), every request is counted, and a client leaving a
stream stops the worker's."""

import os
import subprocess
import sys
import time

import httpx
import pytest

from bench.cluster import ROOT, LocalCluster, free_port, wait_http

_SERVE = """
import sys, uvicorn
from router.app import create_app
from router.config import RouterConfig
app = create_app(RouterConfig(decode_urls=sys.argv[2:], request_timeout_s=1.0))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
"""


@pytest.fixture(scope="module")
def asgi_router(fake_urls):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(port), *fake_urls], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _count(url: str, endpoint: str, status: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("pdserve_requests_total{") and f'endpoint="{endpoint}"' in line and \
                f'status="{status}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _running(urls: list[str]) -> int:
    return sum(httpx.get(f"{u}/load").json()["running"] for u in urls)


def _tokens_sent(urls: list[str]) -> int:
    return sum(httpx.get(f"{u}/load").json()["tokens_sent"] for u in urls)


def test_a_slow_request_gets_504_and_every_request_is_counted(asgi_router, fake_urls):
    ok_before, slow_before = _count(asgi_router, "chat", "200"), _count(asgi_router, "chat", "504")
    body = {"model": "fake", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 500, "ignore_eos": True}
    r = httpx.post(f"{asgi_router}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
    r = httpx.post(f"{asgi_router}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=10)
    assert r.status_code == 200
    assert _count(asgi_router, "chat", "504") == slow_before + 1 and _count(asgi_router, "chat", "200") == ok_before + 1
    r = httpx.post(f"{asgi_router}/v1/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and _count(asgi_router, "chat", "400") >= 1


def test_a_client_leaving_a_stream_stops_the_worker(asgi_router, fake_urls):
    cluster = LocalCluster.in_front_of(fake_urls)
    body = {"model": "fake", "messages": [{"role": "user", "content": "go"}], "max_tokens": 500, "ignore_eos": True,
            "stream": True}
    before = _tokens_sent(cluster.decode_urls)
    with httpx.stream("POST", f"{asgi_router}/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        next(r.iter_bytes())
    deadline = time.monotonic() + 5
    while _running(cluster.decode_urls) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(cluster.decode_urls) == 0
    assert 0 < _tokens_sent(cluster.decode_urls) - before < 100  # 500 at 20 ms each: the stream was closed
    assert _count(asgi_router, "chat", "499") >= 1
