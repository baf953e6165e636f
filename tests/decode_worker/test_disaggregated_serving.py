"""End to end through real processes: client -> router -> prefill worker -> host transport -> decode worker."""

import httpx
import pytest
from openai import OpenAI

from tests.helpers import hf_greedy

CHATS = [
    [{"role": "user", "content": "What is the capital of France? Tell me about its history, its people and "
                                 "its river in a few sentences."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three primary colours and say why painters call them primary."}],
]


def _client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("chat", CHATS)
def test_disaggregated_greedy_matches_transformers(chat, router_url, cluster, demo_hf, demo_model_name):
    hf_model, hf_tok = demo_hf
    prompt = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]
    expected = hf_greedy(hf_model, prompt, 24)
    before = cluster.load(cluster.prefill_urls[0])["tokens_computed"]
    r = _client(router_url).chat.completions.create(model=demo_model_name, messages=chat, max_tokens=24,
                                                    temperature=0)
    assert r.choices[0].message.content == hf_tok.decode(expected, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(expected)
    assert r.usage.prompt_tokens == len(prompt)
    assert cluster.load(cluster.prefill_urls[0])["tokens_computed"] > before  # the prefill worker did the work


def test_conditional_disaggregation_prefills_on_decode_with_same_tokens(cluster, router_url, demo_model_name):
    local_router = cluster.start_router("--local-prefill-tokens", "100000")
    chat = [{"role": "user", "content": "Name four animals that live in the sea, and one fact about each."}]
    remote = _client(router_url).chat.completions.create(model=demo_model_name, messages=chat, max_tokens=20,
                                                         temperature=0)
    before = cluster.load(cluster.prefill_urls[0])["tokens_computed"]
    local = _client(local_router).chat.completions.create(model=demo_model_name, messages=chat, max_tokens=20,
                                                          temperature=0)
    assert local.choices[0].message.content == remote.choices[0].message.content
    assert cluster.load(cluster.prefill_urls[0])["tokens_computed"] == before  # prefill worker untouched


def test_streaming_gives_the_same_text_as_non_streaming(router_url, demo_model_name):
    client = _client(router_url)
    chat = [{"role": "user", "content": "Write two sentences about autumn leaves falling in a quiet park."}]
    full = client.chat.completions.create(model=demo_model_name, messages=chat, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model=demo_model_name, messages=chat, max_tokens=30,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_second_turn_reuses_cached_blocks(router_url, cluster, demo_model_name):
    client = _client(router_url)
    turn1 = [{"role": "system", "content": "You are a helpful assistant who explains things about the ocean, "
                                           "tides, waves, currents and the creatures that live in deep water."},
             {"role": "user", "content": "Why is the sea salty?"}]
    r1 = client.chat.completions.create(model=demo_model_name, messages=turn1, max_tokens=16, temperature=0)
    decode_before = cluster.load(cluster.decode_urls[0])["prompt_tokens_cached"]
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And why are the tides higher at full moon?"}]
    r2 = client.chat.completions.create(model=demo_model_name, messages=turn2, max_tokens=16, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= 48
    assert cluster.load(cluster.decode_urls[0])["prompt_tokens_cached"] > decode_before


def test_no_blocks_leak_after_requests(router_url, cluster, demo_model_name):
    client = _client(router_url)
    for i in range(3):
        stream = client.chat.completions.create(model=demo_model_name, max_tokens=200, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": f"Count to {100 + i}."}])
        next(iter(stream))
        stream.close()  # the client leaves mid-stream
    for url in cluster.prefill_urls + cluster.decode_urls:
        for _ in range(50):
            load = cluster.load(url)
            if load["running"] == 0:
                break
            __import__("time").sleep(0.1)
        assert load["running"] == 0 and load["waiting"] == 0


def test_bad_input_never_reaches_a_worker(router_url, cluster, demo_model_name):
    before = cluster.load(cluster.decode_urls[0])["tokens_computed"]
    cases = [
        ({"model": demo_model_name, "messages": []}, 400),
        ({"model": demo_model_name, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400),
        ({"model": demo_model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400),
        ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400),
    ]
    for body, status in cases:
        r = httpx.post(f"{router_url}/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == status, body
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{router_url}/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    big = {"model": demo_model_name, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    r = httpx.post(f"{router_url}/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
    assert cluster.load(cluster.decode_urls[0])["tokens_computed"] == before


def test_a_decode_worker_without_room_for_a_transfer_prefills_the_prompt_itself(demo_gguf, demo_model_name):
    """Prompts that each need more than half the decode worker's pool, sent at once through a router that
    disaggregates every prompt: only one can have its blocks reserved for a transfer at a time; the others wait
    and are prefilled by the decode worker itself instead of being refused, with the same greedy tokens, and
    every block comes back on both workers."""
    import asyncio

    from bench.cluster import LocalCluster

    c = LocalCluster(str(demo_gguf), prefill=1, decode=1, kv_cache_bytes=8 << 20)
    try:
        router = c.start_router("--local-prefill-tokens", "0")
        decode, prefill = c.decode_urls[0], c.prefill_urls[0]
        total = c.load(decode)["total_blocks"]
        prompt = [100 + i % 5000 for i in range(16 * (total // 2) + 1)]  # total // 2 + 1 blocks

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(f"{router}/v1/completions", json={
                    "model": demo_model_name, "prompt": prompt, "max_tokens": 4, "temperature": 0})
                    for _ in range(3)))

        replies = asyncio.run(burst())
        assert [r.status_code for r in replies] == [200] * 3, [r.text[:300] for r in replies]
        texts = [r.json()["choices"][0]["text"] for r in replies]
        assert texts == [texts[0]] * 3 and all(r.json()["usage"]["completion_tokens"] == 4 for r in replies)
        for url in (decode, prefill):
            load = c.load(url)
            assert load["free_blocks"] == load["total_blocks"] and load["running"] == 0
    finally:
        c.close()
