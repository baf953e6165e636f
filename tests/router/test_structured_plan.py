"""router.structured.plan: what a request asks of its output's shape."""

import pytest
from pydantic import ValidationError

from router.errors import OpenAIError
from router.schemas import ChatCompletionRequest
from router.structured import plan

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "x": {"type": "integer"}}, "required": ["x"]}}}


def _plan(parser=None, reasoning=None, **body):
    return plan(ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **body}), True, parser, reasoning)


def test_a_grammar_turns_the_reasoning_parser_off():
    p = _plan(reasoning="deepseek_r1", response_format={"type": "json_object"})
    assert p.grammar == ("json_object", "") and p.reasoning_parser is None
    assert _plan(reasoning="deepseek_r1").reasoning_parser == "deepseek_r1"


def test_tool_choices():
    named = _plan(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}})
    assert named.tool_mode == "named" and named.function == "f" and named.grammar[0] == "json_schema"
    assert _plan(tools=[TOOL], tool_choice="required").tool_mode == "required"
    assert _plan("hermes", tools=[TOOL]).tool_mode == "auto"
    none = _plan("hermes", tools=[TOOL], tool_choice="none")
    assert none.tool_mode is None and none.tools is None
    with pytest.raises(OpenAIError, match="tool-call parser"):
        _plan(tools=[TOOL])


def test_bad_grammars_and_logit_bias_keys_are_400s():
    with pytest.raises(OpenAIError) as e:
        _plan(structured_outputs={"regex": "a(b"})
    assert e.value.status == 400 and e.value.param == "structured_outputs"
    for key in ("²", "-1", "x"):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "logit_bias": {key: 1}})


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_tool_calls_without_parallel_tool_calls_keep_the_first(parallel):
    from router.chat_output import ChoiceReader, assemble

    p = _plan("hermes", tools=[TOOL], parallel_tool_calls=parallel)
    assert p.single_call is not parallel
    text = ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>')
    for pieces in ([text], [text[i : i + 7] for i in range(0, len(text), 7)]):  # whole, and streamed
        reader = ChoiceReader(p)
        deltas = [d for piece in pieces for d in reader.feed(piece)] + reader.finish()
        calls = assemble(deltas)["tool_calls"]
        assert [c["function"]["arguments"] for c in calls] == (['{"x": 1}', '{"x": 2}'] if parallel else ['{"x": 1}'])
        assert reader.finish_reason("stop") == "tool_calls"
