"""The decode worker's NDJSON line, encoded without pydantic, is exactly a GenerateChunk: every field of the
schema, the values the engine produced, one line."""

import json

import pytest

from decode_worker.app import _chunk
from engine.outputs import FinishReason, RequestOutput, TokenLogprob
from protocol.messages import GenerateChunk, TokenLogprobWire

OUTPUTS = [
    RequestOutput("a", [17], " héllo 日本", False, None, 120, 32, 3),
    RequestOutput("b", [2], "", True, FinishReason.STOP, 7, 0, 9,
                  [TokenLogprob(2, -0.25, ((2, -0.25), (5, -1.5)))]),
    RequestOutput("c", [9, 10], "\"quoted\"\n", True, FinishReason.LENGTH, 1, 1, 64, []),
]


@pytest.mark.parametrize("out", OUTPUTS, ids=[o.request_id for o in OUTPUTS])
def test_a_line_is_the_generate_chunk_of_the_output(out):
    line = _chunk(out)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert set(json.loads(line)) == set(GenerateChunk.model_fields)  # no field of the schema left out
    expected = GenerateChunk(
        token_ids=out.new_token_ids, text=out.text_delta, finished=out.finished,
        finish_reason=out.finish_reason.value if out.finish_reason else None,
        logprobs=[TokenLogprobWire(token_id=lp.token_id, logprob=lp.logprob, top=list(lp.top)) for lp in out.logprobs],
        prompt_tokens=out.num_prompt_tokens, cached_tokens=out.num_cached_tokens,
        completion_tokens=out.num_output_tokens)
    assert GenerateChunk.model_validate_json(line) == expected
