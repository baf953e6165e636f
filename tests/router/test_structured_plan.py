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
