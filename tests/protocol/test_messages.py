"""The router writes worker requests and reads their chunks through msgspec structs (`ParamsOut`,
`GenerateOut`, `PrefillOut`, `ChunkView`): the same fields, defaults and documents as the pydantic models the
workers validate."""

import json

import msgspec
import pytest

from protocol.messages import (
    ChunkView,
    GenerateChunk,
    GenerateOut,
    GenerateRequest,
    LogprobView,
    ParamsOut,
    PrefillOut,
    PrefillRequest,
    TokenLogprobWire,
    WireSamplingParams,
    decode_frame,
    encode_frame,
    encode_out,
)


@pytest.mark.parametrize(("struct", "model"), [(ParamsOut, WireSamplingParams), (GenerateOut, GenerateRequest),
                                               (PrefillOut, PrefillRequest)])
def test_the_routers_request_structs_have_the_models_fields_and_defaults(struct, model):
    assert struct.__struct_fields__ == tuple(model.model_fields)
    for f in msgspec.structs.fields(struct):
        info = model.model_fields[f.name]
        assert f.required == info.is_required(), f.name
        if not f.required:
            default = f.default_factory() if f.default_factory is not msgspec.NODEFAULT else f.default
            assert default == info.get_default(call_default_factory=True), f.name


def test_the_routers_requests_are_the_documents_the_workers_validate():
    kw = {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["\n\n", "é"], "logprobs": 2,
          "ignore_eos": True}
    pairs = [
        (GenerateOut("r-1", [1, 2, 49151], ParamsOut(**kw), "http://p:1"),
         GenerateRequest(request_id="r-1", prompt_token_ids=[1, 2, 49151], params=WireSamplingParams(**kw),
                         prefill_url="http://p:1")),
        (GenerateOut("r-2", list(range(400)), ParamsOut()),
         GenerateRequest(request_id="r-2", prompt_token_ids=list(range(400)), params=WireSamplingParams())),
        (PrefillOut("r-3", [5], ParamsOut(**kw)),
         PrefillRequest(request_id="r-3", prompt_token_ids=[5], params=WireSamplingParams(**kw))),
    ]
    for out, model in pairs:
        assert json.loads(encode_out(out)) == json.loads(model.model_dump_json())
        assert type(model).model_validate_json(encode_out(out)) == model


def test_a_frame_is_a_list_of_chunk_views_with_every_generate_chunk_field_and_default():
    assert ChunkView.__struct_fields__ == tuple(GenerateChunk.model_fields)
    assert LogprobView.__struct_fields__ == tuple(TokenLogprobWire.model_fields)
    assert [msgspec.structs.asdict(c) for c in decode_frame(b"[{}]")] == [GenerateChunk().model_dump()]
    chunks = [GenerateChunk(request_id="a", token_ids=[9, 10], text="a\u00e9\n", finished=True, finish_reason="length",
                            prompt_tokens=3, cached_tokens=2, completion_tokens=5, error={"code": "x"},
                            logprobs=[TokenLogprobWire(token_id=9, logprob=-0.5, top=[(9, -0.5)])]),
              GenerateChunk(request_id="b", token_ids=[1])]
    line = encode_frame([c.model_dump() for c in chunks])
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line a frame, whatever the texts hold
    views = decode_frame(line)
    assert [json.loads(msgspec.json.encode(v)) for v in views] == [json.loads(c.model_dump_json()) for c in chunks]
    assert decode_frame(encode_frame(views)) == views
    for bad in (b'[{"token_ids": "x"}]', b"not json", b'[{"finished": 1.5}]', b'{"token_ids": [1]}'):
        with pytest.raises(ValueError):
            decode_frame(bad)
