"""The OpenAI request bodies the router accepts, validated before anything reaches a worker.

The pydantic models are the schema (the OpenAPI document, the FastAPI routes) and give the error messages.
The generation endpoints' hot path decodes a body with msgspec first (`parse`): structs that accept a
subset of what the models accept, with the same values, ~4x less CPU (~14 against ~38 us a 1.6 KB chat
request, cold, on the CI machine). A body they refuse, or one that needs what they do not model (extra
fields on a message, which the chat template sees), goes to the pydantic model, which accepts it or says
why not. tests/router/test_schemas.py holds the two to the same fields, defaults and values.
"""

import json
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's extension: exactly one of a JSON Schema, a regular expression, a list of choices, a grammar."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "StructuredOutputs":
        if sum(v is not None for v in (self.json_, self.regex, self.choice, self.grammar)) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice, grammar")
        return self


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class _FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: _FunctionName


def _logit_bias(v: dict[str, float] | None) -> dict[str, float] | None:
    if v is None:
        return None
    if len(v) > 300:
        raise ValueError("logit_bias takes at most 300 tokens")
    for k, b in v.items():
        if not (k.isascii() and k.isdigit()):
            raise ValueError(f"logit_bias keys are token ids, not {k!r}")
        if not -100 <= b <= 100:
            raise ValueError("logit_bias values must be in [-100, 100]")
    return v


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    structured_outputs: StructuredOutputs | None = None
    # Scheduling priority (vLLM's: lower first); None: the key's. A key's requests may not go below its own.
    priority: int | None = Field(default=None, ge=-1000, le=1000)

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        return _stop_list(v)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        return _logit_bias(v)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def as_template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it: set fields (and extra ones), content as text, and an
        assistant's tool calls with their arguments as objects (what chat templates expect, as
        transformers' do), not JSON text."""
        fields = {k: v for k, v in self.__dict__.items() if v is not None}
        if self.model_extra:
            fields.update((k, v) for k, v in self.model_extra.items() if v is not None)
        fields["content"] = self.text()
        if isinstance(fields.get("tool_calls"), list):
            fields["tool_calls"] = [_template_call(c) for c in fields["tool_calls"]]
        return fields

    def text(self) -> str:
        return _text(self.content)


def _template_call(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        arguments = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": arguments}}


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):  # content parts: only text is supported
        parts = []
        for p in content:
            if p.get("type") != "text":
                raise ValueError(f"content part type {p.get('type')!r} is not supported (text only)")
            parts.append(str(p.get("text", "")))
        return "".join(parts)
    return content or ""


def _stop_list(v: Any) -> list[str]:
    if v is not None and not isinstance(v, str | list):
        raise ValueError("stop must be a string or a list of strings")
    stops = [v] if isinstance(v, str) else list(v or [])
    if any(not isinstance(s, str) for s in stops):
        raise ValueError("stop must be a string or a list of strings")
    if len(stops) > 4:
        raise ValueError("at most 4 stop sequences")
    if any(not s for s in stops):
        raise ValueError("stop sequences must be non-empty")
    return stops


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice other than none or auto needs tools")
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        if named is not None and named not in {t.function.name for t in self.tools}:
            raise ValueError(f"tool_choice names {named!r}, which is not in tools")
        if self.tools and len({t.function.name for t in self.tools}) != len(self.tools):
            raise ValueError("tools have the same name twice")
        return self

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(BaseModel):
    """POST /tokenize: a prompt, or chat messages (rendered with the model's chat template), as token ids."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids as text."""

    model: str
    tokens: list[int]


class CompletionRequest(_Sampling):
    # One prompt (text or token ids) or several (each gets n choices, in order).
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and any(isinstance(p, str | list) and not p for p in self.prompt):
            raise ValueError("a prompt in the list is empty")
        if isinstance(self.prompt, list) and len(self.prompt) > 64 and not isinstance(self.prompt[0], int):
            raise ValueError("at most 64 prompts a request")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or the list's."""
        p = self.prompt
        return list(p) if isinstance(p, list) and p and not isinstance(p[0], int) else [p]

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def output_limit(self) -> int | None:
        return self.max_tokens


# --- the hot path's decoding: msgspec structs for the common case, the models above for the rest ---

_Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
_Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
_Positive = Annotated[int, Meta(ge=1)]


class _FastStreamOptions(Struct):
    include_usage: bool = False


class _FastMessage(Struct, forbid_unknown_fields=True):  # a field more: the model keeps it for the template
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def as_template_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": _text(self.content)}


class _FastSampling(Struct, kw_only=True):
    model: str
    max_tokens: _Positive | None = None
    temperature: _Temperature = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0)] = 0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    n: Annotated[int, Meta(ge=1, le=16)] = 1
    stop: Any = None  # normalized to a list (as the model's validator does)
    seed: int | None = None
    presence_penalty: _Penalty = 0.0
    frequency_penalty: _Penalty = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0)] = 1.0
    stream: bool = False
    stream_options: _FastStreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    priority: Annotated[int, Meta(ge=-1000, le=1000)] | None = None
    # What the structs leave to the models (a body setting one goes to them): None here.
    logit_bias: Any = None
    structured_outputs: Any = None

    def __post_init__(self) -> None:
        self.stop = _stop_list(self.stop)
        if self.logit_bias is not None or self.structured_outputs is not None:
            raise ValueError("the model validates these")


class FastChatRequest(_FastSampling, kw_only=True):
    messages: Annotated[list[_FastMessage], Meta(min_length=1)]
    max_completion_tokens: _Positive | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: Any = None  # these three too: the model's
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.response_format is not None or self.tools is not None or self.tool_choice is not None:
            raise ValueError("the model validates these")

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class FastCompletionRequest(_FastSampling, kw_only=True):
    prompt: str | list[int]
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompt or self.echo:
            raise ValueError("an empty prompt or echo: the model says which")

    def prompts(self) -> list[str | list[int]]:
        return [self.prompt]

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def output_limit(self) -> int | None:
        return self.max_tokens


_DECODERS = {True: msgspec.json.Decoder(FastChatRequest), False: msgspec.json.Decoder(FastCompletionRequest)}
_MODELS = {True: ChatCompletionRequest, False: CompletionRequest}


GenerationRequest = FastChatRequest | FastCompletionRequest | ChatCompletionRequest | CompletionRequest


def parse(chat: bool, raw: bytes) -> GenerationRequest:
    """A chat (or completion) request body, validated: the fast struct where it takes the body, else the
    pydantic model; pydantic's ValidationError where the body is invalid."""
    try:
        return _DECODERS[chat].decode(raw)
    except msgspec.MsgspecError:
        pass
    return _MODELS[chat].model_validate_json(raw)
