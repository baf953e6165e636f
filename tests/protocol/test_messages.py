"""The router writes worker requests and reads their chunks through msgspec (`wire_json`, `decode_chunk`): the
same documents as pydantic's."""

import json

import msgspec
import pytest

from protocol.messages import (
    ChunkView,
    GenerateChunk,
    GenerateRequest,
    LogprobView,
    PrefillRequest,
    TokenLogprobWire,
    WireSamplingParams,
    decode_chunk,
    wire_json,
)


def test_wire_json_writes_the_document_model_dump_json_writes():
    params = WireSamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=["\n\n", "é"],
                                logprobs=2, ignore_eos=True)
    messages = [
        GenerateRequest(request_id="r-1", prompt_token_ids=[1, 2, 49151], params=params, prefill_url="http://p:1"),
        GenerateRequest.model_construct(request_id="r-2", prompt_token_ids=list(range(400)),
                                        params=WireSamplingParams(), prefill_url=None),
        PrefillRequest(request_id="r-3", prompt_token_ids=[5], params=params),
        GenerateChunk(token_ids=[9], text="hi \"there\"\n", finished=True, finish_reason="stop",
                      logprobs=[TokenLogprobWire(token_id=9, logprob=-0.25, top=[(9, -0.25), (4, -2.0)])]),
    ]
    for m in messages:
        assert json.loads(wire_json(m)) == json.loads(m.model_dump_json())
        assert type(m).model_validate_json(wire_json(m)) == m


def test_the_routers_chunk_view_reads_every_generate_chunk_field_with_the_same_defaults():
    assert ChunkView.__struct_fields__ == tuple(GenerateChunk.model_fields)
    assert LogprobView.__struct_fields__ == tuple(TokenLogprobWire.model_fields)
    assert msgspec.structs.asdict(decode_chunk(b"{}")) == GenerateChunk().model_dump()
    chunk = GenerateChunk(token_ids=[9, 10], text="a\u00e9", finished=True, finish_reason="length", prompt_tokens=3,
                          cached_tokens=2, completion_tokens=5, error={"code": "x"},
                          logprobs=[TokenLogprobWire(token_id=9, logprob=-0.5, top=[(9, -0.5)])])
    view = decode_chunk(chunk.model_dump_json().encode())
    assert json.loads(msgspec.json.encode(view)) == json.loads(chunk.model_dump_json())
    for bad in (b'{"token_ids": "x"}', b"not json", b'{"finished": 1.5}'):
        with pytest.raises(ValueError):
            decode_chunk(bad)
