"""Structured outputs in the engine (engine/guided.py) and logit_bias, on the demo model: every constrained
answer is in its grammar, constrained and free rows share a batch without touching each other, overlapped
scheduling changes nothing, a seeded constrained request is reproducible, and the disaggregated handoff (the
first token sampled on a prefill engine, the rest on a decode engine) gives the same answer as one engine."""

import json
import re

import jsonschema
import pytest

from bench.json_schemas import SCHEMAS
from engine.config import EngineConfig
from engine.errors import RequestError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.helpers import host_pair


@pytest.fixture(scope="module")
def engines(demo_gguf):
    return {overlap: LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=64 << 20, async_scheduling=overlap))
            for overlap in (True, False)}


def _chat(engine, text: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])


def _schema_params(schema: dict, **kw) -> SamplingParams:
    kw.setdefault("temperature", 0)
    return SamplingParams(max_tokens=160, grammar=("json_schema", json.dumps(schema)), **kw)


def test_every_schema_answer_validates_and_overlap_changes_nothing(engines):
    prompts = [_chat(engines[True], f"Give me example data number {i} as JSON.") for i in range(len(SCHEMAS))]
    params = [_schema_params(s) for s in SCHEMAS]
    got = {overlap: e.generate(prompts, params) for overlap, e in engines.items()}
    for schema, c in zip(SCHEMAS, got[True], strict=True):
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)
    assert [c.token_ids for c in got[True]] == [c.token_ids for c in got[False]]


def test_free_rows_are_untouched_by_constrained_rows_in_the_batch(engines):
    e = engines[True]
    free = [_chat(e, "Name three colors."), _chat(e, "What is the capital of France?")]
    alone = e.generate(free, SamplingParams(max_tokens=24, temperature=0))
    mixed = e.generate([free[0], _chat(e, "Is the sky blue?"), free[1], _chat(e, "Pick a number.")],
                       [SamplingParams(max_tokens=24, temperature=0), SamplingParams(max_tokens=8, temperature=0,
                        grammar=("choice", '["yes", "no"]')), SamplingParams(max_tokens=24, temperature=0),
                        SamplingParams(max_tokens=8, temperature=0, grammar=("regex", "[1-9][0-9]?"))])
    assert [mixed[0].token_ids, mixed[2].token_ids] == [c.token_ids for c in alone]
    assert mixed[1].text in ("yes", "no") and mixed[1].finish_reason == "stop"
    assert re.fullmatch("[1-9][0-9]?", mixed[3].text), mixed[3].text


def test_seeded_constrained_sampling_is_reproducible(engines):
    e = engines[True]
    prompt = _chat(e, "Describe a person as JSON.")
    params = _schema_params(SCHEMAS[0], temperature=1.0, seed=11)
    first, again = e.generate([prompt, prompt], [params, params])
    assert first.token_ids == again.token_ids
    jsonschema.validate(json.loads(first.text), SCHEMAS[0])
    other = e.generate([prompt], [_schema_params(SCHEMAS[0], temperature=1.0, seed=12)])[0]
    jsonschema.validate(json.loads(other.text), SCHEMAS[0])


@pytest.mark.parametrize("grammar", [("json_schema", '{"type": "nope"}'), ("regex", "a(b"), ("choice", "[]"),
                                     ("json_schema", "{not json")])
def test_a_grammar_that_cannot_be_built_is_refused(engines, grammar):
    with pytest.raises(RequestError, match="cannot be used"):
        engines[True].add_request("bad", [1, 2, 3], SamplingParams(grammar=grammar))


def test_logit_bias_forces_and_bans_tokens(engines):
    e = engines[True]
    prompt = _chat(e, "What is 2+2?")
    plain = e.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0]
    banned = plain.token_ids[0]
    without = e.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logit_bias=((banned, -100.0),)))[0]
    assert banned not in without.token_ids
    forced = e.tokenizer.encode(" banana", add_special_tokens=False)[0]
    got = e.generate([prompt], SamplingParams(max_tokens=3, temperature=0, logit_bias=((forced, 100.0),)))[0]
    assert got.token_ids == [forced] * 3
    with pytest.raises(RequestError, match="logit_bias"):
        e.add_request("x", prompt, SamplingParams(logit_bias=((10**7, 1.0),)))


def test_the_disaggregated_handoff_keeps_the_grammar(engines, demo_gguf):
    """A prefill engine samples the first token under the grammar and its KV goes over the host transport; a
    decode engine takes the token and goes on: the same answer as one engine."""
    e = engines[True]
    prompt = _chat(e, "Give me a city as JSON.")
    params = _schema_params(SCHEMAS[1])
    whole = e.generate([prompt], params)[0]
    with host_pair(str(demo_gguf)) as (prefill, decode, sender):
        reserved = decode.reserve_remote("r", prompt, params)
        prefill.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=0, grammar=params.grammar),
                            hold_kv=True)
        while prefill.has_unfinished():
            out = prefill.step()
        sender.write_blocks("decode", prefill.held_blocks("r"), reserved.block_ids)
        prefill.release_held("r")
        tokens = list(decode.start_remote("r", out[0].new_token_ids[0], []).new_token_ids)
        while decode.has_unfinished():
            tokens += [t for o in decode.step() for t in o.new_token_ids]
        assert tokens == whole.token_ids


def test_masks_for_more_rows_than_max_num_seqs(engines):
    """A decode worker's remote starts are not capped by max_num_seqs: the mask buffer grows."""
    g = engines[True].grammars
    rows = len(g._host) + 3
    matchers = [(i, g.matcher(("choice", '["yes", "no"]'))) for i in range(rows)]
    got_rows, allowed = g.masks(matchers)
    assert got_rows.tolist() == list(range(rows)) and allowed.shape == (rows, g.vocab_size)
    yes = engines[True].tokenizer.encode("yes", add_special_tokens=False)[0]
    assert bool(allowed[:, yes].all()) and int(allowed.sum()) < rows * 10
