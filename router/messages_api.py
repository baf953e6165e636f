"""Anthropic's Messages API (POST /v1/messages) as chat completions: a request as the chat request it means
(`to_chat`), and the chat completion (`from_chat`) or its chunks (`stream_events`) as the Message or its
server-sent events, shaped as the `anthropic` SDK's models (anthropic.types) read them.

Content blocks come in the order thinking, text, tool uses. A tool use's id is the chat call's with `call_`
made `toolu_`; sent back, it names both the call and its tool_result, which is all a chat template needs.
`usage.input_tokens` counts the prompt tokens not read from the prefix cache, as Anthropic's does;
`cache_read_input_tokens` the rest.
"""

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Block(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, citations, signatures


def _text_blocks(v: Any) -> Any:
    """Content blocks the server can read: an image or a document is refused by name."""
    for b in v if isinstance(v, list) else ():
        kind = b.get("type") if isinstance(b, dict) else None
        if kind not in _BLOCK_TYPES:
            raise ValueError(f"content block type {kind!r} is not supported: this server takes text, "
                             "tool_use, tool_result and thinking blocks only")
    return v


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False  # chat has no place for it: the content says what went wrong

    _blocks = field_validator("content", mode="before")(_text_blocks)


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: str


class RedactedThinkingBlock(_Block):  # encrypted by another server: nothing to show a template
    type: Literal["redacted_thinking"]


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                         Field(discriminator="type")]
_BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


class InputMessage(_Block):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    _blocks = field_validator("content", mode="before")(_text_blocks)

    @model_validator(mode="after")
    def _sides(self) -> "InputMessage":
        for b in self.content if isinstance(self.content, list) else ():
            if b.type in ("tool_use", "thinking", "redacted_thinking") and self.role != "assistant":
                raise ValueError(f"a {b.type} block belongs in an assistant message")
            if b.type == "tool_result" and self.role != "user":
                raise ValueError("a tool_result block belongs in a user message")
        return self


class ToolDefinition(_Block):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class ToolChoice(_Block):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> "ToolChoice":
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type tool needs name")
        return self


class Metadata(_Block):
    user_id: str | None = None


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown Anthropic fields (thinking, service_tier) are ignored

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=4)  # the engine's limit, as chat's
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: Metadata | None = None

    @field_validator("tools", mode="before")
    @classmethod
    def _client_tools(cls, v: Any) -> Any:
        for t in v if isinstance(v, list) else ():
            if isinstance(t, dict) and t.get("type") not in (None, "custom"):
                raise ValueError(f"tool type {t['type']!r} is not supported: "
                                 "client tools (name, input_schema) only")
        return v


# --- the request as a chat completions request ---

def to_chat(req: MessagesRequest) -> dict[str, Any]:
    """The chat completions request body that asks what `req` asks."""
    messages = [{"role": "system", "content": _text(req.system)}] if req.system else []
    for m in req.messages:
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
        elif m.role == "assistant":
            messages.append(_assistant(m.content))
        else:
            messages += _user(m.content)
    body: dict[str, Any] = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens}
    if req.tools:
        body["tools"] = [{"type": "function", "function": _function(t)} for t in req.tools]
    choice = req.tool_choice
    if choice is not None:
        named = {"type": "function", "function": {"name": choice.name}}
        body["tool_choice"] = named if choice.type == "tool" else _TOOL_CHOICES[choice.type]
        if choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    optional = {"stop": req.stop_sequences, "temperature": req.temperature, "top_p": req.top_p,
                "top_k": req.top_k, "user": req.metadata.user_id if req.metadata else None}
    body.update((k, v) for k, v in optional.items() if v is not None)
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _function(tool: ToolDefinition) -> dict[str, Any]:
    fn = {"name": tool.name, "description": tool.description, "parameters": tool.input_schema}
    return {k: v for k, v in fn.items() if v is not None}


def _text(content: str | list[TextBlock] | None) -> str:
    return content if isinstance(content, str) else "\n".join(b.text for b in content or ())


def _assistant(blocks: list[Any]) -> dict[str, Any]:
    text = _text([b for b in blocks if b.type == "text"])
    calls = [{"id": b.id, "type": "function",
              "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
             for b in blocks if b.type == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    thinking = "".join(b.thinking for b in blocks if b.type == "thinking")
    if thinking:
        message["reasoning_content"] = thinking
    if calls:
        message["tool_calls"] = calls
    return message


def _user(blocks: list[Any]) -> list[dict[str, Any]]:
    """Tool results first, as tool messages right after the assistant's calls, then the user's text."""
    out = [{"role": "tool", "tool_call_id": b.tool_use_id, "content": _text(b.content)}
           for b in blocks if b.type == "tool_result"]
    texts = [b for b in blocks if b.type == "text"]
    if texts or not out:
        out.append({"role": "user", "content": _text(texts)})
    return out


# --- chat output as a Message ---

def from_chat(req: MessagesRequest, chat: dict[str, Any], message_id: str,
              stop_sequence: str | None = None) -> dict[str, Any]:
    """The Message for a chat.completion body (its first choice) answering `to_chat(req)`. stop_sequence: the
    one of req.stop_sequences that ended the text, where the caller knows (chat's "stop" does not say; a
    vLLM-style `stop_reason` string on the choice is read too)."""
    choice = chat["choices"][0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for i, call in enumerate(message.get("tool_calls") or ()):
        content.append({"type": "tool_use", "id": _tool_use_id(call.get("id"), message_id, i),
                        "name": call["function"]["name"], "input": _input(call["function"]["arguments"])})
    stop_sequence = stop_sequence or _stop_sequence(req, choice)
    reason = _stop_reason(choice.get("finish_reason"), stop_sequence)
    return {"id": message_id, "type": "message", "role": "assistant", "model": req.model, "content": content,
            "stop_reason": reason, "stop_sequence": stop_sequence if reason == "stop_sequence" else None,
            "usage": _usage(chat.get("usage"))}


def _tool_use_id(call_id: str | None, message_id: str, index: int) -> str:
    if call_id is None:
        return f"toolu_{message_id.removeprefix('msg_')}_{index}"
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as its input: {} where they are not a JSON object (cut off by max_tokens)."""
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _stop_sequence(req: MessagesRequest, choice: dict[str, Any]) -> str | None:
    matched = choice.get("stop_reason")
    return matched if isinstance(matched, str) and matched in (req.stop_sequences or ()) else None


def _stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str:
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason == "tool_calls":
        return "tool_use"
    return "stop_sequence" if stop_sequence and finish_reason == "stop" else "end_turn"


def _usage(u: dict[str, Any] | None) -> dict[str, Any]:
    u = u or {"prompt_tokens": 0, "completion_tokens": 0}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"input_tokens": u["prompt_tokens"] - cached, "output_tokens": u["completion_tokens"],
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


# --- errors ---

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
                503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}
_FROM_OPENAI = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                "not_found_error": 404, "rate_limit_exceeded": 429, "service_unavailable": 503,
                "timeout": 504}  # router/errors.py's kinds, by the status they stand for


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error body for an HTTP status."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


# --- chat chunks as Message stream events ---

@dataclass(slots=True)
class _OpenBlock:
    kind: str  # "thinking" | "text" | "tool_use"
    index: int
    parts: list[str] = field(default_factory=list)


class _MessageStream:
    """One streamed message's events, block by block: a block starts with its first delta and stops when the
    next one starts or the output ends."""

    def __init__(self, req: MessagesRequest, message_id: str):
        self.req, self.id = req, message_id
        self.blocks = 0  # started
        self.open: _OpenBlock | None = None
        self.calls: dict[int, _OpenBlock] = {}  # by the chat tool call's index
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage: dict[str, Any] | None = None

    @staticmethod
    def event(kind: str, **fields: Any) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n".encode()

    def start(self, prompt_tokens: int | None) -> bytes:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.req.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": prompt_tokens or 0, "output_tokens": 0}}
        return self.event("message_start", message=message)

    def feed(self, delta: dict[str, Any]) -> list[bytes]:
        out = []
        if delta.get("reasoning_content"):
            out += self._text("thinking", delta["reasoning_content"])
        if delta.get("content"):
            out += self._text("text", delta["content"])
        for call in delta.get("tool_calls") or ():
            out += self._call(call)
        return out

    def end(self) -> list[bytes]:
        """The open block stopped, then the stop reason and the usage (totals: they overwrite the start's)."""
        out = self._stop() if self.open else []
        reason = _stop_reason(self.finish_reason, self.stop_sequence)
        stop_sequence = self.stop_sequence if reason == "stop_sequence" else None
        delta = {"stop_reason": reason, "stop_sequence": stop_sequence}
        return [*out, self.event("message_delta", delta=delta, usage=_usage(self.usage)),
                self.event("message_stop")]

    def _text(self, kind: str, text: str) -> list[bytes]:
        out = [] if self.open and self.open.kind == kind else self._start(kind, {kind: ""})
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {"type": "text_delta",
                                                                                          "text": text}
        return [*out, self.event("content_block_delta", index=self.open.index, delta=delta)]

    def _call(self, call: dict[str, Any]) -> list[bytes]:
        fn = call.get("function") or {}
        out = []
        if call["index"] not in self.calls:
            block = {"id": _tool_use_id(call.get("id"), self.id, len(self.calls)), "name": fn.get("name"),
                     "input": {}}
            out = self._start("tool_use", block)
            self.calls[call["index"]] = self.open
        if self.calls[call["index"]] is not self.open:
            raise ValueError(f"tool call {call['index']}'s arguments came after the next content block began")
        if fn.get("arguments"):
            out.append(self.event("content_block_delta", index=self.open.index,
                                  delta={"type": "input_json_delta", "partial_json": fn["arguments"]}))
        return out

    def _start(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self._stop() if self.open else []
        self.open = _OpenBlock(kind, self.blocks)
        self.blocks += 1
        if kind == "thinking":
            block["signature"] = ""
        return [*out, self.event("content_block_start", index=self.open.index,
                                 content_block={"type": kind, **block})]

    def _stop(self) -> list[bytes]:
        block, self.open = self.open, None
        return [self.event("content_block_stop", index=block.index)]


async def stream_events(req: MessagesRequest, chunks: AsyncIterator[dict[str, Any]], message_id: str,
                        prompt_tokens: int | None = None) -> AsyncIterator[bytes]:
    """Anthropic's SSE events (`event: <type>\\ndata: <json>\\n\\n`) for a chat completion's chunks: deltas of
    content, reasoning_content and tool_calls, a finish_reason (with a vLLM-style `stop_reason` naming the
    stop sequence, if any), a last chunk with `usage` and no choices; an `{"error": {...}}` chunk ends it with
    an error event. prompt_tokens: for message_start, where known before the output."""
    stream = _MessageStream(req, message_id)
    yield stream.start(prompt_tokens)
    async for chunk in chunks:
        if "error" in chunk:
            error = chunk["error"]  # OpenAI's shape: {"message", "type", "param", "code"}
            message = str(error.get("message") or "worker error")
            body = error_body(_FROM_OPENAI.get(error.get("type"), 500), message)
            yield stream.event("error", error=body["error"])
            return
        if chunk.get("usage"):
            stream.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            for event in stream.feed(choice.get("delta") or {}):
                yield event
            if choice.get("finish_reason"):
                stream.finish_reason = choice["finish_reason"]
                stream.stop_sequence = _stop_sequence(req, choice)
    for event in stream.end():
        yield event
