"""POST /generate, answered by the decode worker's plain-ASGI path: every token as an NDJSON line, a malformed
body refused with 422 before the engine sees it, the internal token required when the cluster has one."""

import json
from types import SimpleNamespace

import httpx
import pytest

from bench.engine_delivery import StubEngine
from decode_worker.app import create_app
from engine.async_engine import AsyncEngine


@pytest.fixture
def make_app():
    engines = []

    def make(token: str | None = None):
        stub = StubEngine(0.001, 5)
        engines.append(AsyncEngine(stub))
        config = SimpleNamespace(name="t", role="decode", transfer_timeout_s=5.0, internal_token=token)
        return create_app(SimpleNamespace(engine=engines[-1], config=config, descriptor=None, descriptors=[])), stub

    yield make
    for e in engines:
        e.shutdown()


async def post(app, body: bytes, headers: dict | None = None) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as c:
        return await c.post("/generate", content=body, headers={"content-type": "application/json", **(headers or {})})


GOOD = json.dumps({"request_id": "r1", "prompt_token_ids": [1, 2, 3], "params": {"max_tokens": 5}}).encode()


async def test_every_token_arrives_as_a_line_and_the_last_one_finishes(make_app):
    app, _ = make_app()
    resp = await post(app, GOOD)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert [line["token_ids"] for line in lines] == [[1001], [1002], [1003], [1004], [1005]]
    assert [line["finished"] for line in lines] == [False] * 4 + [True]


@pytest.mark.parametrize("body", [b"{not json", json.dumps({"request_id": "r2", "params": {}}).encode()])
async def test_a_malformed_body_gets_422_and_never_reaches_the_engine(make_app, body):
    app, stub = make_app()
    resp = await post(app, body)
    assert resp.status_code == 422 and resp.json()["detail"]
    assert stub.steps == 0 and not stub.running


async def test_the_internal_token_is_required_when_set(make_app):
    app, stub = make_app(token="s3cret")
    refused = await post(app, GOOD)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_internal_token"
    assert stub.steps == 0
    assert (await post(app, GOOD, {"x-pdserve-token": "s3cret"})).status_code == 200
