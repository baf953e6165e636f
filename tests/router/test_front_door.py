"""The model-as-a-service front door: API keys, per-key limits shared through Redis, admission control,
usage counted once per request. Routers are real processes; workers are fakes; Redis is real."""

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.router.conftest import REDIS_URL

ADMIN = "test-admin-token"
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello there"}]}


def _auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def _create(router: str, **fields) -> dict:
    r = httpx.post(f"{router}/admin/keys", json={"name": "k", **fields}, headers=_auth(ADMIN), timeout=10)
    assert r.status_code == 201, r.text
    return r.json()


def _usage(router: str, key_id: str) -> dict:
    rows = httpx.get(f"{router}/admin/usage", params={"key_id": key_id}, headers=_auth(ADMIN), timeout=10).json()
    total: dict[str, int] = {}
    for row in rows["data"]:
        for k, v in row.items():
            if isinstance(v, int):
                total[k] = total.get(k, 0) + v
    return total


def _shared(redis_namespace: str) -> tuple[str, ...]:
    return ("--auth", "--admin-token", ADMIN, "--redis-url", REDIS_URL, "--redis-namespace", redis_namespace)


def _assert_openai_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code


def test_api_keys_are_required_hashed_and_scoped(routers, tmp_path):
    keys_file = tmp_path / "keys.json"
    router = routers("--auth", "--admin-token", ADMIN, "--keys-file", str(keys_file))
    url = f"{router}/v1/chat/completions"
    _assert_openai_error(httpx.post(url, json=CHAT), 401, "invalid_api_key")
    _assert_openai_error(httpx.post(url, json=CHAT, headers=_auth("pds-nope-nope")), 401, "invalid_api_key")
    _assert_openai_error(httpx.get(f"{router}/v1/models"), 401, "invalid_api_key")
    _assert_openai_error(httpx.post(f"{router}/admin/keys", json={"name": "x"}), 401, "invalid_admin_token")
    # The CLI creates a key through the admin API; the key is shown once and stored only hashed.
    out = subprocess.run([sys.executable, "-m", "pdserve_cli.main", "keys", "create", "--name", "team-a", "--rpm",
                          "600", "--tpm", "200000", "--router", router, "--admin-token", ADMIN],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    created = json.loads(out.stdout)
    assert created["name"] == "team-a" and created["rpm"] == 600 and created["tpm"] == 200000
    assert created["key"] not in keys_file.read_text() and "key_hash" not in created
    r = httpx.post(url, json=CHAT, headers=_auth(created["key"]), timeout=10)
    assert r.status_code == 200, r.text
    # Anthropic's clients send the key as x-api-key (the Messages API and its model list)
    messages = {"model": "fake", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{router}/v1/messages", json=messages, headers={"x-api-key": created["key"]}, timeout=10)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{router}/v1/models", headers={"x-api-key": created["key"]}).status_code == 200
    r = httpx.post(f"{router}/v1/messages", json=messages, headers={"x-api-key": "pds-no-no"})
    assert r.status_code == 401 and r.json()["type"] == "error", r.text  # in Anthropic's shape there
    listed = httpx.get(f"{router}/admin/keys", headers=_auth(ADMIN)).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]] and created["key"] not in json.dumps(listed)
    patch = f"{router}/admin/keys/{created['id']}"
    assert httpx.patch(patch, json={"enabled": False}, headers=_auth(ADMIN)).json()["enabled"] is False
    time.sleep(0.6)  # lookups are cached for half a second
    _assert_openai_error(httpx.post(url, json=CHAT, headers=_auth(created["key"])), 401, "invalid_api_key")
    httpx.patch(patch, json={"enabled": True}, headers=_auth(ADMIN))
    time.sleep(0.6)
    assert httpx.post(url, json=CHAT, headers=_auth(created["key"]), timeout=10).status_code == 200
    other = _create(router, models=["another-model"])
    _assert_openai_error(httpx.post(url, json=CHAT, headers=_auth(other["key"])), 403, "model_not_allowed")
    metrics = httpx.get(f"{router}/metrics").text
    assert created["key"] not in metrics and 'key="team-a"' in metrics


def test_two_routers_enforce_one_keys_rpm_together(routers, redis_namespace):
    a, b = routers(*_shared(redis_namespace)), routers(*_shared(redis_namespace))
    key = _create(a, rpm=10)["key"]
    statuses, refusals = [], []
    for i in range(16):
        r = httpx.post(f"{(a, b)[i % 2]}/v1/chat/completions", json=CHAT, headers=_auth(key), timeout=10)
        statuses.append(r.status_code)
        if r.status_code == 429:
            refusals.append(r)
    assert 10 <= statuses.count(200) <= 11 and statuses.count(429) == 16 - statuses.count(200)
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
               for r in refusals)


def test_two_routers_enforce_one_keys_tpm_together_and_return_unused_tokens(routers, redis_namespace):
    a, b = routers(*_shared(redis_namespace)), routers(*_shared(redis_namespace))
    key = _create(a, tpm=1000)["key"]
    body = {**CHAT, "max_tokens": 100}
    ok = []
    for i in range(30):
        r = httpx.post(f"{(a, b)[i % 2]}/v1/chat/completions", json=body, headers=_auth(key), timeout=10)
        if r.status_code == 200:
            ok.append(r.json()["usage"])
        else:
            _assert_openai_error(r, 429, "rate_limit_exceeded")
    prompt = ok[0]["prompt_tokens"]
    # Each request reserves prompt + 100 and, when it ends, gives back the 99 it did not generate.
    expected = (1000 - prompt - 100) // (prompt + 1) + 1
    assert expected <= len(ok) <= expected + 1  # + 1: the bucket refills ~17 tokens a second meanwhile
    too_big = httpx.post(f"{a}/v1/chat/completions", json={**CHAT, "max_tokens": 2000}, headers=_auth(key))
    _assert_openai_error(too_big, 429, "rate_limit_exceeded")
    assert "retry-after" not in too_big.headers  # it can never fit: waiting would not help


async def test_abusive_key_gets_429s_while_a_polite_key_is_served(routers, redis_namespace):
    router = routers(*_shared(redis_namespace))
    abuser, polite = _create(router, rpm=20, name="abuser")["key"], _create(router, rpm=1000, name="polite")["key"]
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:
        url = f"{router}/v1/chat/completions"
        flood = [client.post(url, json=CHAT, headers=_auth(abuser)) for _ in range(200)]

        async def politely() -> list[int]:
            codes = []
            for _ in range(20):
                codes.append((await client.post(url, json=CHAT, headers=_auth(polite))).status_code)
                await asyncio.sleep(0.01)
            return codes

        flooded, polite_codes = await asyncio.gather(asyncio.gather(*flood), politely())
    codes = [r.status_code for r in flooded]
    assert codes.count(200) <= 21 and codes.count(429) >= 179
    assert polite_codes == [200] * 20


def test_revoking_a_key_takes_effect_on_every_router_within_a_second(routers, redis_namespace):
    a, b = routers(*_shared(redis_namespace)), routers(*_shared(redis_namespace))
    created = _create(a)
    for router in (a, b):
        assert httpx.post(f"{router}/v1/chat/completions", json=CHAT, headers=_auth(created["key"])).status_code == 200
    assert httpx.delete(f"{b}/admin/keys/{created['id']}", headers=_auth(ADMIN)).status_code == 200
    revoked_at = time.monotonic()
    pending = {a, b}
    while pending and time.monotonic() - revoked_at < 1.0:
        for router in list(pending):
            if httpx.post(f"{router}/v1/chat/completions", json=CHAT,
                          headers=_auth(created["key"])).status_code == 401:
                pending.discard(router)
    assert not pending, f"still accepted after a second by {pending}"


def test_streamed_cancelled_and_failed_requests_are_billed_once(routers, redis_namespace):
    router = routers(*_shared(redis_namespace))
    created = _create(router, max_concurrent=1)
    key, url = created["key"], f"{router}/v1/chat/completions"
    long = {**CHAT, "max_tokens": 300, "ignore_eos": True}
    assert httpx.post(url, json=CHAT, headers=_auth(key), timeout=10).status_code == 200  # 1 token
    with httpx.stream("POST", url, json={**CHAT, "stream": True, "max_tokens": 5, "ignore_eos": True},
                      headers=_auth(key), timeout=10) as r:
        assert r.status_code == 200 and b"[DONE]" in r.read()  # 5 tokens
    with httpx.stream("POST", url, json={**long, "stream": True}, headers=_auth(key), timeout=10) as r:
        next(r.iter_bytes())  # streamed, then the client leaves
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=long, headers=_auth(key), timeout=0.3)  # non-streamed, the client leaves
    failed = httpx.post(url, json={**CHAT, "stop": ["FAIL"]}, headers=_auth(key), timeout=10)
    assert failed.status_code == 400
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        usage = _usage(router, created["id"])
        if usage.get("requests") == 5:
            break
        time.sleep(0.1)
    assert usage["requests"] == 5 and usage["cancelled"] == 2 and usage["errors"] == 1
    assert 6 < usage["completion_tokens"] < 6 + 2 * 100  # 1 + 5 + what the two cut-off requests got
    time.sleep(0.3)
    assert httpx.get(f"{router}/metrics").text.count('pdserve_key_requests_total{key="k",model="fake"') == 3
    # Every slot came back: the key (max_concurrent=1) is served again.
    assert httpx.post(url, json=CHAT, headers=_auth(key), timeout=10).status_code == 200


def test_saturated_cluster_refuses_new_requests_early_and_keeps_in_flight_ones(routers):
    router = routers("--max-queued-prefill-tokens", "20", "--max-prompt-tokens", "500", "--max-output-tokens", "1000")
    url = f"{router}/v1/chat/completions"
    _assert_openai_error(httpx.post(url, json={**CHAT, "max_tokens": 1001}), 400, "max_tokens_too_large")
    long_prompt = {"model": "fake", "messages": [{"role": "user", "content": "word " * 600}]}
    _assert_openai_error(httpx.post(url, json=long_prompt), 400, "prompt_too_long")
    slow = {**CHAT, "stream": True, "max_tokens": 5, "ignore_eos": True, "stop": ["SLOW_PREFILL"]}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(lambda: httpx.post(url, json=slow, timeout=10))
        time.sleep(0.4)  # in flight before its first token: its ~30 prompt tokens wait to be computed
        refused = httpx.post(url, json=CHAT, timeout=10)
        _assert_openai_error(refused, 503, "overloaded")
        assert refused.headers["retry-after"] == "1"
        assert b"[DONE]" in first.result().content  # the in-flight request was not dropped
    assert httpx.post(url, json=CHAT, timeout=10).status_code == 200  # and then there is room again
    # Once a request has its first token its prompt is computed: a long answer does not hold the queue full.
    with httpx.stream("POST", url, json={**CHAT, "stream": True, "max_tokens": 40, "ignore_eos": True},
                      timeout=10) as decoding:
        chunks = decoding.iter_bytes()
        next(chunks)
        assert httpx.post(url, json=CHAT, timeout=10).status_code == 200
        assert b"[DONE]" in b"".join(chunks)


def test_predicted_ttft_over_its_slo_refuses_new_work():
    from protocol.messages import WorkerLoad
    from router.config import RouterConfig
    from router.frontdoor import FrontDoor
    from router.metrics import RouterMetrics
    from router.workers import Worker, WorkerPool

    pool = WorkerPool.__new__(WorkerPool)
    busy = WorkerLoad(running=4, waiting=0, free_blocks=50, total_blocks=100, tokens_computed=0,
                      prompt_tokens_cached=0)
    pool.workers = [Worker("http://p0", "prefill", healthy=True, load=busy, prefill_rate=1000.0),
                    Worker("http://d0", "decode", healthy=True, load=busy)]
    door = FrontDoor(RouterConfig(decode_urls=["http://d0"], ttft_slo_s=2.0), None, RouterMetrics())
    assert door.capacity(pool, 1500).ok  # 1.5 s of queued prefill at 1,000 tokens/s
    refused = door.capacity(pool, 2500)
    assert not refused.ok and "predicted time to first token is 2.5 s" in refused.reason
    assert door.overloaded(refused.reason).status == 503


async def test_in_memory_usage_drops_hours_older_than_redis_would_keep():
    from router.limits import USAGE_TTL_S, LocalUsage, _hour

    usage = LocalUsage()
    now = time.time()
    stale, kept = _hour(now - USAGE_TTL_S - 7200), _hour(now - USAGE_TTL_S + 7200)
    usage.rows[(stale, "k1", "m")] = {"requests": 5}
    usage.rows[(kept, "k1", "m")] = {"requests": 3}
    await usage.add("k1", "m", {"requests": 1})
    assert (stale, "k1", "m") not in usage.rows
    assert usage.rows[(kept, "k1", "m")] == {"requests": 3} and len(usage.rows) == 2
