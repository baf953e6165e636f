"""The router writes worker requests through msgspec (`wire_json`): the same documents as pydantic's."""

import json

from protocol.messages import (
    GenerateChunk,
    GenerateRequest,
    PrefillRequest,
    TokenLogprobWire,
    WireSamplingParams,
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
