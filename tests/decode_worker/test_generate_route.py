"""A real decode worker (engine core + frontend processes): a router's channel carries each step of its
requests as one frame, with the tokens a blocking engine run gives; a stop string stops the request on the
worker at once; a request aborted, or whose router's channel closes, frees its blocks at once; bad requests
are refused before the engine sees them."""

import asyncio
import json
import time
import uuid

import httpx
import pytest

from engine.sampling_params import SamplingParams

GREEDY = {"temperature": 0, "ignore_eos": True}


def _prompt(demo_engine, text: str) -> list[int]:
    return demo_engine.tokenizer.encode_chat([{"role": "user", "content": text}])


class ChannelReader:
    """A router's side of a channel: every chunk by request, and the frames as they came."""

    def __init__(self, client: httpx.AsyncClient, url: str):
        self.id = uuid.uuid4().hex
        self.frames: list[list[dict]] = []
        self.chunks: dict[str, list[dict]] = {}
        self.opened = asyncio.Event()
        self.task = asyncio.ensure_future(self._read(client, url))

    async def _read(self, client: httpx.AsyncClient, url: str) -> None:
        async with client.stream("GET", f"{url}/channel/{self.id}") as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                self.opened.set()
                frame = json.loads(line)
                if frame:
                    self.frames.append(frame)
                for c in frame:
                    self.chunks.setdefault(c["request_id"], []).append(c)

    def done(self, rid: str) -> bool:
        return bool(self.chunks.get(rid)) and self.chunks[rid][-1]["finished"]

    async def until(self, predicate, timeout_s: float = 60.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await asyncio.sleep(0.01)

    def close(self) -> None:
        self.task.cancel()


async def _load(client: httpx.AsyncClient, url: str) -> dict:
    return (await client.get(f"{url}/load")).json()


async def test_a_channel_carries_each_step_of_its_requests_as_one_frame(cluster, demo_engine):
    url = cluster.decode_urls[0]
    prompts = [_prompt(demo_engine, q) for q in ("Name a colour.", "What is the tallest mountain?")]
    expected = [r.token_ids for r in demo_engine.generate(prompts, SamplingParams(max_tokens=10, **GREEDY))]
    async with httpx.AsyncClient(timeout=60) as client:
        channel = ChannelReader(client, url)
        await channel.until(channel.opened.is_set)
        for i, prompt in enumerate(prompts):
            body = {"request_id": f"c{i}", "prompt_token_ids": prompt, "channel": channel.id,
                    "params": {"max_tokens": 10, **GREEDY}}
            r = await client.post(f"{url}/generate", json=body)
            assert r.status_code == 200, r.text
        await channel.until(lambda: channel.done("c0") and channel.done("c1"))
        channel.close()
    assert [[t for c in channel.chunks[f"c{i}"] for t in c["token_ids"]] for i in range(2)] == expected
    both = [f for f in channel.frames if {c["request_id"] for c in f} == {"c0", "c1"}]
    assert len(both) >= 5  # the steps they ran together came as one frame each
    assert [c["completion_tokens"] for c in channel.chunks["c0"]] == list(range(1, 11))


async def test_without_a_channel_the_response_streams_its_own_frames(cluster, demo_engine):
    url = cluster.decode_urls[0]
    prompt = _prompt(demo_engine, "Name a colour.")
    expected = demo_engine.generate([prompt], SamplingParams(max_tokens=6, **GREEDY))[0]
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f"{url}/generate", json={"request_id": "solo", "prompt_token_ids": prompt,
                                                         "params": {"max_tokens": 6, **GREEDY}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    chunks = [c for line in r.text.splitlines() for c in json.loads(line)]
    assert [t for c in chunks for t in c["token_ids"]] == expected.token_ids
    assert "".join(c["text"] for c in chunks) == expected.text
    assert [c["finished"] for c in chunks] == [False] * 5 + [True]


async def test_a_stop_string_stops_the_request_on_the_worker_at_once(cluster, demo_engine):
    url = cluster.decode_urls[0]
    prompt = _prompt(demo_engine, "Count from one to fifty in words, separated by commas.")
    free = demo_engine.generate([prompt], SamplingParams(max_tokens=40, **GREEDY))[0]
    stop = free.text[len(free.text) // 3:][:4]  # a stop string a third of the way in
    assert stop and free.text.count(stop) >= 1
    async with httpx.AsyncClient(timeout=60) as client:
        before = await _load(client, url)
        r = await client.post(f"{url}/generate", json={"request_id": "stop", "prompt_token_ids": prompt,
                                                         "params": {"max_tokens": 400, "stop": [stop], **GREEDY}})
        t0 = time.monotonic()  # /load is as of the engine's last message: the abort's comes a moment later
        while (after := await _load(client, url))["running"] and time.monotonic() - t0 < 2:
            await asyncio.sleep(0.01)
    chunks = [c for line in r.text.splitlines() for c in json.loads(line)]
    text = "".join(c["text"] for c in chunks)
    assert text == free.text[: free.text.index(stop)] and chunks[-1]["finish_reason"] == "stop"
    n = chunks[-1]["completion_tokens"]
    assert n < 40 and [t for c in chunks for t in c["token_ids"]] == free.token_ids[:n]
    # Stopped on the worker with its last chunk: at most a step or two past it, not at max_tokens (400).
    assert after["running"] == 0
    assert after["tokens_computed"] - before["tokens_computed"] <= len(prompt) + n + 3


@pytest.mark.parametrize("how", ["abort", "channel_closed"])
async def test_a_request_given_up_frees_its_blocks_at_once(cluster, demo_engine, how):
    url = cluster.decode_urls[0]
    prompt = _prompt(demo_engine, "Tell me a long story about a lighthouse keeper.")
    async with httpx.AsyncClient(timeout=60) as client:
        total = (await _load(client, url))["total_blocks"]
        channel = ChannelReader(client, url)
        await channel.until(channel.opened.is_set)
        body = {"request_id": f"gone-{how}", "prompt_token_ids": prompt, "channel": channel.id,
                "params": {"max_tokens": 500, **GREEDY}}
        assert (await client.post(f"{url}/generate", json=body)).status_code == 200
        await channel.until(lambda: len(channel.chunks.get(body["request_id"], [])) >= 3)
        assert (await _load(client, url))["running"] == 1
        if how == "abort":
            await client.post(f"{url}/abort/{body['request_id']}")
        else:
            channel.close()
        t0 = time.monotonic()
        while (load := await _load(client, url))["running"] and time.monotonic() - t0 < 2:
            await asyncio.sleep(0.02)
        channel.close()
    assert load["running"] == 0 and load["free_blocks"] == total


async def test_bad_requests_are_refused_before_the_engine_sees_them(cluster):
    url = cluster.decode_urls[0]
    async with httpx.AsyncClient(timeout=60) as client:
        steps = (await _load(client, url))["steps"]
        for body in (b"{not json", json.dumps({"request_id": "r2", "params": {}}).encode()):
            r = await client.post(f"{url}/generate", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["detail"]
        r = await client.post(f"{url}/generate", json={"request_id": "r3", "prompt_token_ids": [1],
                                                         "params": {}, "channel": "nobody-opened-this"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "unknown_channel"
        r = await client.post(f"{url}/generate", json={"request_id": "r4", "prompt_token_ids": [1],
                                                         "params": {"temperature": 9}})
        chunks = [c for line in r.text.splitlines() for c in json.loads(line)]
        assert chunks[-1]["error"]["code"] == "invalid_request" and "temperature" in chunks[-1]["error"]["message"]
        assert (await _load(client, url))["steps"] == steps
