"""What a request asks of its output's shape: the grammar the engine constrains its tokens to, and how the
router reads tool calls back out of the text.

- `response_format` (json_object, json_schema) and vLLM's `structured_outputs` (json, regex, choice,
  grammar) are grammars (protocol/grammar.py).
- `tool_choice` naming a function: the output is that function's arguments, constrained to its
  `parameters` schema, returned as one call. `required`: a JSON list of calls ({"name", "parameters"}, one
  schema per tool, at most one call without `parallel_tool_calls`), constrained likewise. Both are forced
  by the grammar whatever the model's own tool-call format.
- `auto` (the default with tools): the model decides; its text is parsed with its family's tool-call
  parser (router/tool_parsers.py), chosen by the router's `--tool-call-parser` or from the chat template.
- `none`: the tools are not shown to the model and nothing is parsed.

A grammar llguidance cannot build is refused here with a 400 naming the problem, before admission.
"""

import json
from dataclasses import dataclass
from typing import Any

from protocol.grammar import problem
from router.errors import OpenAIError


@dataclass(frozen=True, slots=True)
class OutputPlan:
    grammar: tuple[str, str] | None = None  # (kind, source) for the engine
    tool_mode: str | None = None  # "named" | "required" | "auto" | None
    function: str | None = None  # the named function
    tool_parser: str | None = None  # auto: the parser family
    reasoning_parser: str | None = None
    tools: list[dict[str, Any]] | None = None  # what the chat template is shown
    single_call: bool = False  # auto without parallel_tool_calls: calls after the first are dropped

    @property
    def keeps_special_tokens(self) -> bool:
        """The worker's text keeps special tokens: Mistral's [TOOL_CALLS] is one."""
        return self.tool_mode == "auto" and self.tool_parser == "mistral"

    @property
    def reads_text(self) -> bool:
        """The router turns the text into something else (tool calls, reasoning) before the client sees it."""
        return self.tool_mode is not None or self.reasoning_parser is not None


PLAIN = OutputPlan()


def plan(body: Any, chat: bool, tool_parser: str | None, reasoning_parser: str | None) -> OutputPlan:
    """The request's plan; OpenAIError(400) for a grammar that cannot be built or tools that cannot be read."""
    grammar, param = None, None
    so = getattr(body, "structured_outputs", None)
    if so is not None:
        param = "structured_outputs"
        if so.json_ is not None:
            grammar = ("json_schema", so.json_ if isinstance(so.json_, str) else json.dumps(so.json_))
        elif so.regex is not None:
            grammar = ("regex", so.regex)
        elif so.choice is not None:
            grammar = ("choice", json.dumps(so.choice))
        else:
            grammar = ("grammar", so.grammar)
    rf = getattr(body, "response_format", None) if chat else None
    if rf is not None and rf.type != "text":
        if grammar is not None:
            raise OpenAIError(400, "give response_format or structured_outputs, not both", param="response_format")
        param = "response_format"
        grammar = ("json_object", "") if rf.type == "json_object" else ("json_schema", json.dumps(rf.json_schema.schema_))
    tools = getattr(body, "tools", None) if chat else None
    choice = getattr(body, "tool_choice", None) if chat else None
    mode = function = parser = None
    shown = None
    if tools and choice != "none":
        shown = [t.model_dump(exclude_none=True) for t in tools]
        if grammar is not None and choice not in (None, "auto"):
            raise OpenAIError(400, f"{param} cannot be combined with a forced tool_choice", param="tool_choice")
        if choice is None or choice == "auto":
            if grammar is None:  # with a grammar the output is that, not tool calls
                if tool_parser is None:
                    raise OpenAIError(400, "tool_choice auto needs a tool-call parser for this model (start the "
                                           "router with --tool-call-parser)", param="tool_choice")
                mode, parser = "auto", tool_parser
        elif choice == "required":
            mode, param = "required", "tools"
            grammar = ("json_schema", json.dumps(_calls_schema(tools, body.parallel_tool_calls)))
        else:
            mode, param, function = "named", "tools", choice.function.name
            fn = next(t.function for t in tools if t.function.name == function)
            grammar = ("json_schema", json.dumps(fn.parameters or {"type": "object"}))
    if grammar is not None:
        why = problem(*grammar)
        if why is not None:
            raise OpenAIError(400, f"the {param} cannot be used: {why}", param=param, code="invalid_grammar")
    if grammar is None and mode is None and (reasoning_parser is None or not chat) and shown is None:
        return PLAIN
    # A grammar shapes the whole output, so there is no <think> part to take out of it.
    reasoning = reasoning_parser if chat and grammar is None else None
    single = mode == "auto" and not body.parallel_tool_calls
    return OutputPlan(grammar, mode, function, parser, reasoning, shown, single)


def _calls_schema(tools: list, parallel: bool) -> dict[str, Any]:
    one_of = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                "parameters": t.function.parameters or {"type": "object"}},
               "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    if not parallel:
        schema["maxItems"] = 1
    return schema
