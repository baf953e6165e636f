"""The router's OpenAI API through the official client, against fake workers (no model needed)."""

import time

import httpx
import openai
import pytest
from openai import OpenAI

from bench.cluster import LocalCluster


@pytest.fixture(scope="module")
def fake_cluster(fake_urls):
    cluster = LocalCluster.in_front_of(fake_urls)  # the workers are the fakes of conftest.py
    cluster.router = cluster.start_router()
    yield cluster
    cluster.close()


def _client(cluster) -> OpenAI:
    return OpenAI(base_url=f"{cluster.router}/v1", api_key="unused", max_retries=0)


def _running(cluster) -> int:
    return sum(httpx.get(f"{u}/load").json()["running"] for u in cluster.decode_urls)


def _tokens_sent(cluster) -> int:
    return sum(httpx.get(f"{u}/load").json()["tokens_sent"] for u in cluster.decode_urls)


def test_chat_completion_and_usage(fake_cluster):
    r = _client(fake_cluster).chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.content.startswith("fake-") and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 1 and r.usage.prompt_tokens > 1


def test_completions_with_n_choices(fake_cluster):
    r = _client(fake_cluster).completions.create(model="fake", prompt="Once upon a time", n=2, max_tokens=3)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 2  # one token each


def test_streaming_ends_with_usage_and_done(fake_cluster):
    chunks = list(_client(fake_cluster).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4,
        extra_body={"ignore_eos": True}, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith(" x x x") and chunks[-1].usage.completion_tokens == 4
    assert chunks[0].choices[0].delta.role == "assistant"


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "fake", "messages": []}, 400, "messages"),
    ({"model": "fake", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"model": "fake", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "fake", "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stop": 7}, 400, "stop"),  # found by fuzzing
    ({"model": "fake", "prompt": "hi", "stop": ["ok", 3]}, 400, "stop"),
])
def test_bad_requests_get_openai_errors_and_never_reach_a_worker(fake_cluster, body, status, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    before = sum(httpx.get(f"{u}/load").json()["running"] for u in fake_cluster.decode_urls)
    r = httpx.post(f"{fake_cluster.router}{path}", json=body, timeout=10)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert _running(fake_cluster) == before


def test_openai_client_raises_typed_errors(fake_cluster):
    client = _client(fake_cluster)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)


def test_malformed_and_oversized_bodies(fake_cluster):
    r = httpx.post(f"{fake_cluster.router}/v1/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{fake_cluster.router}/v1/chat/completions", content=b"x" * (5 << 20), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_stops_the_worker(fake_cluster, stream):
    body = {"model": "fake", "messages": [{"role": "user", "content": "go"}], "max_tokens": 500,
            "ignore_eos": True, "stream": stream}
    url = f"{fake_cluster.router}/v1/chat/completions"
    before = _tokens_sent(fake_cluster)
    if stream:
        with httpx.stream("POST", url, json=body, timeout=10) as r:
            next(r.iter_bytes())  # the first tokens arrive, then the client leaves
    else:
        with pytest.raises(httpx.ReadTimeout), httpx.stream("POST", url, json=body, timeout=0.5) as r:
            r.read()
    deadline = time.monotonic() + 5
    while _running(fake_cluster) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert _running(fake_cluster) == 0
    assert 0 < _tokens_sent(fake_cluster) - before < 100  # 500 at 20 ms each: the router closed the stream


def test_request_over_the_time_limit_gets_504_and_stops_the_worker(routers, fake_urls):
    router = routers("--request-timeout-s", "0.5")
    cluster = LocalCluster.in_front_of(fake_urls)
    body = {"model": "fake", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 500,
            "ignore_eos": True}  # 500 tokens 20 ms apart: 10 s
    before = _tokens_sent(cluster)
    start = time.monotonic()
    r = httpx.post(f"{router}/v1/chat/completions", json=body, timeout=10)
    took = time.monotonic() - start
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
    assert 0.4 < took < 3
    deadline = time.monotonic() + 5
    while _running(cluster) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(cluster) == 0
    assert _tokens_sent(cluster) - before < 150  # the worker's stream was closed, not run to its end
    ok = httpx.post(f"{router}/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=10)
    assert ok.status_code == 200  # the router serves on after a timed-out request


def test_one_model_is_retrieved_by_its_id_and_an_unknown_one_is_the_openai_404(fake_cluster):
    client = _client(fake_cluster)
    listed = client.models.list().data
    assert [m.id for m in listed] == ["fake"]
    assert client.models.retrieve("fake").model_dump() == listed[0].model_dump()
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-nope")
    assert e.value.body["code"] == "model_not_found"


def test_tokenize_counts_what_a_request_is_billed_and_detokenize_gives_the_text_back(fake_cluster):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour, please."}]
    chat = _client(fake_cluster).chat.completions.create(model="fake", messages=messages)
    r = httpx.post(f"{fake_cluster.router}/tokenize", json={"model": "fake", "messages": messages}).json()
    assert r["count"] == len(r["tokens"]) == chat.usage.prompt_tokens and r["max_model_len"] == 4096
    text = "The quick brown fox, 42 times: héllo!"
    ids = httpx.post(f"{fake_cluster.router}/tokenize", json={"model": "fake", "prompt": text}).json()["tokens"]
    back = httpx.post(f"{fake_cluster.router}/detokenize", json={"model": "fake", "tokens": ids}).json()
    assert back == {"prompt": text}
    for path, body, code in (("/tokenize", {"model": "fake"}, 400), ("/tokenize", {"model": "x", "prompt": "a"}, 404),
                             ("/detokenize", {"model": "fake", "tokens": [-1]}, 400)):
        bad = httpx.post(f"{fake_cluster.router}{path}", json=body)
        assert bad.status_code == code and set(bad.json()["error"]) == {"message", "type", "param", "code"}
