"""The decode worker's frontend turns the core's steps into frames: one line a step a router channel holding
that router's chunks, every token in order (none dropped, none moved to another request), text that adds
up to the tokens' text, a stop string that ends the request in the chunk that completes it and stops it in
the core in the same step, and errors that end requests with a code."""

import json
import random

import pytest

from decode_worker.streams import Channel, DecodeStreams
from engine.tokenizer_files import load_tokenizer
from protocol.messages import GenerateChunk, GenerateRequest
from worker.ipc import Out, Refused, Step


class FakeCore:
    """The EngineClient surface DecodeStreams uses, recording what reaches the core; it has no room to receive
    a remote prefill's KV."""

    def __init__(self):
        self.added, self.aborted = [], []
        self.error = None

    async def reserve_remote(self, rid, prompt, params, resumed=None):
        from engine.errors import KVCacheFullError

        raise KVCacheFullError("no room now")

    def add(self, rid, prompt, params, hold_kv=False, resumed=None):
        self.added.append(rid)
        self.resumed = resumed

    def abort(self, rid):
        self.aborted.append(rid)


@pytest.fixture(scope="module")
def tokenizer(demo_gguf):
    return load_tokenizer(demo_gguf)


class FakeAborter:
    def __init__(self):
        self.posted = []

    async def post(self, url, timeout):
        self.posted.append(url)


@pytest.fixture
def streams(tokenizer):
    return DecodeStreams(FakeCore(), tokenizer, 16, [{}], sender=None, aborter=FakeAborter())


def request(rid: str, channel: str | None = "c", prefill_url: str | None = None, output_token_ids=(),
            **params) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_token_ids=[1, 2, 3], channel=channel, prefill_url=prefill_url,
                           params={"max_tokens": 1000, "temperature": 0, **params},
                           output_token_ids=list(output_token_ids))


def out(rid: str, tok: int, n: int, reason: str | None = None) -> Out:
    return Out(rid, [tok], n, 0, 3, reason, None)


async def frames(channel: Channel) -> list[list[dict]]:
    data = await channel.next(0.01)
    if data is None or data == b"[]\n":
        return []
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def open_channel(streams: DecodeStreams, name: str) -> Channel:
    channel = streams.channels[name] = Channel(name)
    channel._lines.clear()  # the opening empty frame
    return channel


async def test_a_step_is_one_frame_a_channel_with_its_requests_chunks_in_order(streams):
    a, b = open_channel(streams, "a"), open_channel(streams, "b")
    for rid, ch in (("a1", a), ("b1", b), ("a2", a)):
        streams.start(request(rid, ch.id), ch)
    streams.on_step(Step([out("a1", 10, 1), out("b1", 11, 1), out("a2", 12, 1)]))
    got_a, got_b = await frames(a), await frames(b)
    assert [[c["request_id"] for c in f] for f in got_a] == [["a1", "a2"]]
    assert [[c["request_id"] for c in f] for f in got_b] == [["b1"]]
    for chunk in got_a[0] + got_b[0]:  # every field of the schema, valid
        assert set(chunk) == set(GenerateChunk.model_fields)
        GenerateChunk.model_validate(chunk)


async def test_no_token_is_dropped_reordered_or_given_to_another_request(streams, tokenizer):
    channel = open_channel(streams, "c")
    rng = random.Random(7)
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, isn't it?",
             "Numbers: 12345, 678; symbols &%$ and émojis 🎉 done"]
    tokens = {f"r{i}": tokenizer.encode(t) for i, t in enumerate(texts)}
    for rid in tokens:
        streams.start(request(rid), channel)
    sent = {rid: 0 for rid in tokens}
    while any(sent[r] < len(t) for r, t in tokens.items()):
        live = [r for r in tokens if sent[r] < len(tokens[r])]
        rng.shuffle(live)
        outs = []
        for rid in live[: rng.randint(1, len(live))]:
            n = sent[rid] + 1
            outs.append(out(rid, tokens[rid][n - 1], n, "length" if n == len(tokens[rid]) else None))
            sent[rid] = n
        streams.on_step(Step(outs))
    received = {rid: ([], []) for rid in tokens}
    for frame in await frames(channel):
        for c in frame:
            received[c["request_id"]][0].extend(c["token_ids"])
            received[c["request_id"]][1].append(c["text"])
    for rid, toks in tokens.items():
        assert received[rid][0] == toks
        assert "".join(received[rid][1]) == tokenizer.decode(toks)
    assert streams.in_flight() == 0 and not channel.requests


async def test_a_stop_string_ends_the_request_at_its_token_and_stops_the_core_in_the_same_step(streams, tokenizer):
    channel = open_channel(streams, "c")
    streams.start(request("s", stop=["."]), channel)
    streams.start(request("other"), channel)
    toks = tokenizer.encode("Hello world. And then more words follow here")
    stop_at = next(i for i in range(len(toks)) if "." in tokenizer.decode(toks[: i + 1]))
    for i, tok in enumerate(toks):
        streams.on_step(Step([out("s", tok, i + 1), out("other", 5, i + 1)]))
        if i == stop_at:
            assert streams.client.aborted == ["s"]  # in the step whose token completed the stop string
    chunks = [c for f in await frames(channel) for c in f if c["request_id"] == "s"]
    assert len(chunks) == stop_at + 1  # nothing after the stop, though the core sent more
    assert chunks[-1]["finished"] and chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["completion_tokens"] == stop_at + 1
    assert "".join(c["text"] for c in chunks) == "Hello world"
    assert streams.client.aborted == ["s"] and "other" in streams.streams


async def test_a_migrated_stream_emits_the_same_text_deltas_as_the_undisturbed_one(streams, tokenizer):
    """A stream that comes migrated with k tokens already delivered by another worker emits, for the tokens after
    them, exactly the deltas the undisturbed stream emitted: a character split over the boundary and a tail that
    may begin a stop string (held back) come out as they would have, nothing twice."""
    channel = open_channel(streams, "c")
    toks = tokenizer.encode("Numbers 12, émojis 🎉🎉 and a stop-ish tail: END almost, then END! done")
    stop = ["END!"]
    streams.start(request("whole", stop=stop), channel)
    for i, tok in enumerate(toks):
        streams.on_step(Step([out("whole", tok, i + 1)]))
    deltas = [c["text"] for f in await frames(channel) for c in f]
    assert "".join(deltas) == tokenizer.decode(toks).split("END!")[0]
    stop_at = len(deltas)  # the chunk that completed the stop string ended the stream
    for k in range(1, stop_at - 1):
        rid = f"moved-{k}"
        streams.start(request(rid, stop=stop, output_token_ids=toks[:k]), channel)
        assert streams.client.resumed == toks[:k]
        for i in range(k, stop_at):
            streams.on_step(Step([out(rid, toks[i], i + 1)]))
        assert [c["text"] for f in await frames(channel) for c in f] == deltas[k:stop_at], k


async def test_refusals_and_a_dead_engine_end_requests_with_their_codes(streams):
    channel = open_channel(streams, "c")
    for rid in ("bad", "x", "y"):
        streams.start(request(rid), channel)
    streams.on_step(Step([], [Refused("bad", "invalid_request", "the prompt is empty")]))
    streams.fail_all("rank 1 died")
    chunks = {c["request_id"]: c for f in await frames(channel) for c in f}
    assert chunks["bad"]["error"]["code"] == "invalid_request" and chunks["bad"]["finished"]
    assert {chunks[r]["error"]["code"] for r in ("x", "y")} == {"engine_failed"}
    assert "rank 1 died" in chunks["x"]["error"]["message"] and streams.in_flight() == 0


async def test_a_closed_channel_aborts_its_requests_in_the_core(streams):
    a, b = open_channel(streams, "a"), open_channel(streams, "b")
    streams.start(request("a1", "a"), a)
    streams.start(request("b1", "b"), b)
    streams.drop_channel(a)
    assert streams.client.aborted == ["a1"] and list(streams.streams) == ["b1"] and "a" not in streams.channels


async def test_a_prompt_prefilled_here_for_want_of_room_is_still_aborted_in_the_core(streams):
    """No room to receive the remote prefill: the prompt is prefilled here, and the router's abort reaches
    the core (it used to stop at the finished handshake task and the request ran to max_tokens)."""
    import asyncio

    channel = open_channel(streams, "c")
    req = request("full", prefill_url="http://prefill")
    streams.start(req, channel)
    for _ in range(20):
        await asyncio.sleep(0)
    assert streams.client.added == ["full"] and streams.aborter.posted == ["http://prefill/abort/full"]
    streams.abort("full")
    assert streams.client.aborted == ["full"] and streams.in_flight() == 0


async def test_a_request_after_the_engine_died_ends_with_engine_failed(streams):
    channel = open_channel(streams, "c")
    streams.client.error = "rank 1 died"
    streams.start(request("late"), channel)
    chunks = [c for f in await frames(channel) for c in f]
    assert chunks[-1]["error"]["code"] == "engine_failed" and streams.in_flight() == 0
    assert streams.client.added == []


async def test_the_end_of_text_token_is_not_text_when_special_tokens_are_kept(streams, tokenizer):
    """Kept special tokens (a Mistral tool-call parser reads [TOOL_CALLS]) leave out the token that ended the
    request: an end-of-text is not part of the answer."""
    channel = open_channel(streams, "c")
    words, eos = tokenizer.encode("[a] b", add_special_tokens=False), tokenizer.eos_token_id
    streams.start(request("k", skip_special_tokens=False), channel)
    streams.on_step(Step([out("k", words[0], 1)]))
    streams.on_step(Step([Out("k", [*words[1:], eos], len(words) + 1, 0, 3, "stop", None)]))
    chunks = [c for f in await frames(channel) for c in f]
    assert "".join(c["text"] for c in chunks) == "[a] b" and chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["token_ids"][-1] == eos  # still counted and sent as a token
