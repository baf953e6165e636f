"""Resuming a request after outputs another engine produced (a migrated stream, issue 33): the continuation is
the undisturbed run's, token for token, greedy and seeded (with penalties and a grammar), on one engine and
through the disaggregated handoff (the prefill engine computes prompt + outputs and samples the next token)."""

import dataclasses
import json

import pytest

from engine.config import EngineConfig
from engine.errors import RequestError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.helpers import host_pair

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "people": {"type": "integer"}},
          "required": ["city", "people"]}
PARAMS = {
    "greedy": SamplingParams(max_tokens=40, temperature=0),
    "seeded": SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=11, presence_penalty=0.5,
                             frequency_penalty=0.3, repetition_penalty=1.1),
    "grammar": SamplingParams(max_tokens=40, temperature=0.7, seed=3, grammar=("json_schema", json.dumps(SCHEMA))),
}


@pytest.fixture(scope="module")
def engine(demo_gguf):
    return LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=64 << 20))


def _prompt(engine: LLMEngine) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": "Describe a city you like, with numbers."}])


def _run(engine: LLMEngine, rid: str) -> list[int]:
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    return tokens


@pytest.mark.parametrize("kind", PARAMS)
def test_a_resumed_request_continues_the_undisturbed_run(engine, kind):
    params = PARAMS[kind]
    prompt = _prompt(engine)
    whole = engine.generate([prompt], params)[0].token_ids
    assert len(whole) > 20, whole
    for k in (1, 9, len(whole) - 1):  # a first token, mid-block, the last step
        rid = f"resume-{kind}-{k}"
        engine.add_request(rid, prompt, params, resumed=whole[:k])
        assert _run(engine, rid) == whole[k:], k
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks  # nothing held after


def test_resumed_outputs_are_checked(engine):
    prompt = _prompt(engine)
    with pytest.raises(RequestError, match="max_tokens"):
        engine.add_request("too-many", prompt, SamplingParams(max_tokens=3), resumed=[5, 6, 7])
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request("bad-id", prompt, SamplingParams(max_tokens=8), resumed=[10**9])
    with pytest.raises(RequestError, match="grammar"):  # a JSON grammar cannot start with these
        engine.add_request("off-grammar", prompt, PARAMS["grammar"], resumed=engine.tokenizer.encode("hello"))
    assert not engine.has_unfinished()


@pytest.mark.parametrize("kind", ["greedy", "grammar"])
def test_the_disaggregated_handoff_resumes_too(engine, demo_gguf, kind):
    """The prefill engine computes prompt + resumed outputs and samples the next token (at its position, for
    the seed); its KV goes over the host transport into the decode engine's reservation for all of them."""
    params = PARAMS[kind]
    prompt = _prompt(engine)
    whole = engine.generate([prompt], params)[0].token_ids
    k = 21
    with host_pair(str(demo_gguf)) as (prefill, decode, sender):
        reserved = decode.reserve_remote("r", prompt, params, resumed=whole[:k])
        assert len(reserved.block_ids) == -(-(len(prompt) + k) // decode.config.block_size)
        prefill.add_request("r", prompt, dataclasses.replace(params, max_tokens=k + 1), hold_kv=True,
                            resumed=whole[:k])
        while prefill.has_unfinished():
            out = prefill.step()
        first = out[0].new_token_ids[0]
        assert first == whole[k]
        sender.write_blocks("decode", prefill.held_blocks("r"), reserved.block_ids)
        prefill.release_held("r")
        started = decode.start_remote("r", first, [])
        assert started.num_output_tokens == k + 1
        assert list(started.new_token_ids) + _run(decode, "r") == whole[k:]
        assert decode.block_pool.num_free_blocks == decode.block_pool.num_blocks
