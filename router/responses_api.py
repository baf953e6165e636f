"""OpenAI's Responses API (POST /v1/responses), stateless, as chat completions: a request as the chat request
it means (`to_chat`), and the chat completion (`from_chat`) or its chunks (`stream_events`) as the Response
object or its server-sent events, shaped as the `openai` SDK's models (openai.types.responses) read them.

An output item's id is made from the response's id and the item's place in `output`, so a streamed response
ends with the object `from_chat` gives for the same output. Output is reasoning, then the message, then the
function calls; a streamed one whose text comes after a call gets a second message item there instead.
"""

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

_STATELESS = "this server is stateless: it keeps no responses, so send the whole conversation in input"


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore")  # ids, statuses, annotations of replayed output items


class TextPart(_Item):
    type: Literal["input_text", "output_text"]
    text: str


def _text_parts(v: Any) -> Any:
    """Content parts: text only; an image, file or audio part is refused by name."""
    if isinstance(v, list):
        for p in v:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind not in ("input_text", "output_text"):
                raise ValueError(f"content part type {kind!r} is not supported: this server takes text only")
    return v


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]

    _parts = field_validator("content", mode="before")(_text_parts)


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]

    _parts = field_validator("output", mode="before")(_text_parts)


class ReasoningItem(_Item):
    """A replayed reasoning item: its text goes to the next assistant message (templates may show it)."""

    type: Literal["reasoning"]
    content: list[dict[str, Any]] | None = None

    def text(self) -> str:
        parts = self.content or ()
        return "".join(str(p.get("text", "")) for p in parts if p.get("type") == "reasoning_text")


def _item_type(v: Any) -> str:
    return v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", "message")


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]
_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


class FunctionTool(_Item):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Item):
    type: Literal["function"]
    name: str


class TextFormat(_Item):
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema(self) -> "TextFormat":
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format of type json_schema needs schema")
        return self

    def echo(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "name": self.name, "description": self.description,
                "schema": self.schema_, "strict": self.strict}


class TextConfig(_Item):
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown Responses fields are accepted and ignored

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = False
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool = False
    text: TextConfig | None = None
    user: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _known_items(cls, v: Any) -> Any:
        for i, item in enumerate(v if isinstance(v, list) else ()):
            if not isinstance(item, dict):
                raise ValueError(f"input[{i}] is not an object")
            if item.get("type", "message") not in _ITEM_TYPES:
                raise ValueError(f"input[{i}]: item type {item['type']!r} is not supported (messages, "
                                 f"function calls and their outputs only; {_STATELESS})")
        return v

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, v: Any) -> Any:
        for t in v if isinstance(v, list) else ():
            if isinstance(t, dict) and t.get("type") != "function":
                raise ValueError(f"tool type {t.get('type')!r} is not supported: function tools only")
        return v

    @model_validator(mode="after")
    def _stateless(self) -> "ResponsesRequest":
        if self.store:
            raise ValueError(f"store=true is not supported: {_STATELESS} (send store=false)")
        if self.previous_response_id is not None:
            raise ValueError(f"previous_response_id is not supported: {_STATELESS}")
        if self.conversation is not None:
            raise ValueError(f"conversation is not supported: {_STATELESS}")
        if self.background:
            raise ValueError(f"background=true is not supported: {_STATELESS}")
        return self


# --- the request as a chat completions request ---

def to_chat(req: ResponsesRequest) -> dict[str, Any]:
    """The chat completions request body that asks what `req` asks."""
    body: dict[str, Any] = {"model": req.model, "messages": _messages(req)}
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
    if isinstance(req.tool_choice, NamedFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    body["parallel_tool_calls"] = req.parallel_tool_calls
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description,
                  "strict": fmt.strict}
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {k: v for k, v in schema.items() if v is not None}}
    elif fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    optional = {"max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
                "top_p": req.top_p, "seed": req.seed, "user": req.user}
    body.update((k, v) for k, v in optional.items() if v is not None)
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return [*out, {"role": "user", "content": req.input}]
    reasoning = ""  # held for the next assistant message
    for item in req.input:
        if isinstance(item, ReasoningItem):
            reasoning += item.text()
            continue
        if isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
            continue
        if isinstance(item, FunctionCallItem):  # joins the assistant message it follows (text, other calls)
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant" and not reasoning:
                out[-1].setdefault("tool_calls", []).append(call)
                continue
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        else:  # developer is what open models' templates call system
            role = "system" if item.role == "developer" else item.role
            message = {"role": role, "content": _text(item.content)}
        if reasoning and message["role"] == "assistant":
            message["reasoning_content"], reasoning = reasoning, ""
        out.append(message)
    return out


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "\n".join(p.text for p in content)


# --- chat output as a Response ---

def from_chat(req: ResponsesRequest, chat: dict[str, Any], response_id: str) -> dict[str, Any]:
    """The Response object for a chat.completion body (its first choice) answering `to_chat(req)`."""
    choice = chat["choices"][0]
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    items: list[tuple[str, Any]] = []
    if message.get("reasoning_content"):
        items.append(("reasoning", message["reasoning_content"]))
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        items.append(("message", message.get("content") or ""))
    items += [("function_call", c) for c in calls]
    output = []
    for index, (kind, value) in enumerate(items):
        status = _status(finish) if index == len(items) - 1 else "completed"
        item_id = _item_id(kind, response_id, index)
        if kind == "function_call":
            call_id = value.get("id") or _item_id("call", response_id, index)
            fn = value["function"]
            output.append(_call_item(item_id, call_id, fn["name"], fn["arguments"], status))
        else:
            output.append(_text_item(kind, item_id, status, [_part(kind, value)]))
    return _response(req, response_id, chat.get("created") or int(time.time()), _status(finish), output,
                     chat.get("usage"))


_PREFIXES = {"message": "msg", "reasoning": "rs", "function_call": "fc", "call": "call"}


def _item_id(kind: str, response_id: str, index: int) -> str:
    return f"{_PREFIXES[kind]}_{response_id.removeprefix('resp_')}_{index}"


def _status(finish_reason: str | None) -> str:
    """The response's status, and its last output item's: cut off by the output limit or not."""
    return "incomplete" if finish_reason == "length" else "completed"


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _text_item(kind: str, item_id: str, status: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning", "id": item_id, "summary": [], "content": parts, "status": status}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": parts}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _usage(u: dict[str, Any] | None) -> dict[str, Any] | None:
    if u is None:
        return None
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached,
                                                                         "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


def _response(req: ResponsesRequest, response_id: str, created_at: int, status: str,
              output: list[dict[str, Any]], usage: dict[str, Any] | None,
              error: dict[str, Any] | None = None) -> dict[str, Any]:
    tool_choice = req.tool_choice or "auto"
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status, "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": req.model,
        "output": output, "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": None,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": req.text.format.echo() if req.text and req.text.format else {"type": "text"}},
        "tool_choice": tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
        "tools": [t.model_dump() for t in req.tools or ()], "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled", "usage": _usage(usage), "user": req.user, "metadata": req.metadata or {},
        "store": False, "background": False,
    }


# --- chat chunks as Response stream events ---

@dataclass(slots=True)
class _OpenItem:
    kind: str  # "message" | "reasoning" | "function_call"
    index: int  # in output
    id: str
    call_id: str | None = None
    name: str | None = None
    parts: list[str] = field(default_factory=list)  # the text, or the call's arguments, so far


class _ResponseStream:
    """One streamed response's events, item by item: an item opens when its first delta comes and closes when
    the next one opens or the output ends."""

    def __init__(self, req: ResponsesRequest, response_id: str, created_at: int):
        self.req, self.id, self.created_at = req, response_id, created_at
        self.seq = 0
        self.output: list[dict[str, Any]] = []  # closed items
        self.open: _OpenItem | None = None
        self.calls: dict[int, _OpenItem] = {}  # by the chat tool call's index
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def event(self, kind: str, **fields: Any) -> bytes:
        data = json.dumps({"type": kind, "sequence_number": self.seq, **fields}, ensure_ascii=False)
        self.seq += 1
        return f"event: {kind}\ndata: {data}\n\n".encode()

    def response(self, status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return _response(self.req, self.id, self.created_at, status, self.output, self.usage, error)

    def feed(self, delta: dict[str, Any]) -> list[bytes]:
        out = []
        if delta.get("reasoning_content"):
            out += self._text("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            out += self._text("message", delta["content"])
        for call in delta.get("tool_calls") or ():
            out += self._call(call)
        return out

    def end(self) -> list[bytes]:
        """The open item closed, an empty message where there is neither text nor a call, and the response."""
        status = _status(self.finish_reason)
        kinds = [i["type"] for i in self.output] + ([self.open.kind] if self.open else [])
        answered = any(k != "reasoning" for k in kinds)
        out = self._close(status if answered else "completed") if self.open else []
        if not answered:
            out += self._start("message") + self._close(status)
        return [*out, self.event(f"response.{status}", response=self.response(status))]

    def fail(self, error: dict[str, Any]) -> list[bytes]:
        out = self._close("incomplete") if self.open else []
        code = error.get("code") if error.get("code") == "rate_limit_exceeded" else "server_error"
        failure = {"code": code, "message": str(error.get("message") or "worker error")}
        return [*out, self.event("response.failed", response=self.response("failed", failure))]

    def _text(self, kind: str, text: str) -> list[bytes]:
        out = [] if self.open and self.open.kind == kind else self._start(kind)
        item = self.open
        item.parts.append(text)
        name = "output_text" if kind == "message" else "reasoning_text"
        logprobs = {"logprobs": []} if kind == "message" else {}
        return [*out, self.event(f"response.{name}.delta", item_id=item.id, output_index=item.index,
                                 content_index=0, delta=text, **logprobs)]

    def _call(self, call: dict[str, Any]) -> list[bytes]:
        fn = call.get("function") or {}
        out = []
        if call["index"] not in self.calls:
            out = self._start("function_call", call.get("id"), fn.get("name"))
            self.calls[call["index"]] = self.open
        item = self.calls[call["index"]]
        if item is not self.open:
            raise ValueError(f"tool call {call['index']}'s arguments came after the next output item began")
        if fn.get("arguments"):
            item.parts.append(fn["arguments"])
            out.append(self.event("response.function_call_arguments.delta", item_id=item.id,
                                  output_index=item.index, delta=fn["arguments"]))
        return out

    def _start(self, kind: str, call_id: str | None = None, name: str | None = None) -> list[bytes]:
        out = self._close("completed") if self.open else []
        index = len(self.output)
        item = self.open = _OpenItem(kind, index, _item_id(kind, self.id, index), call_id, name)
        if kind == "function_call" and call_id is None:
            item.call_id = _item_id("call", self.id, index)
        out.append(self.event("response.output_item.added", output_index=index,
                              item=self._item(item, "in_progress")))
        if kind != "function_call":
            out.append(self.event("response.content_part.added", item_id=item.id, output_index=index,
                                  content_index=0, part=_part(kind, "")))
        return out

    def _close(self, status: str) -> list[bytes]:
        item, self.open = self.open, None
        text, ids = "".join(item.parts), {"item_id": item.id, "output_index": item.index}
        if item.kind == "function_call":
            out = [self.event("response.function_call_arguments.done", **ids, arguments=text)]
        else:
            name = "output_text" if item.kind == "message" else "reasoning_text"
            logprobs = {"logprobs": []} if item.kind == "message" else {}
            out = [self.event(f"response.{name}.done", **ids, content_index=0, text=text, **logprobs),
                   self.event("response.content_part.done", **ids, content_index=0,
                              part=_part(item.kind, text))]
        done = self._item(item, status)
        self.output.append(done)
        return [*out, self.event("response.output_item.done", output_index=item.index, item=done)]

    def _item(self, item: _OpenItem, status: str) -> dict[str, Any]:
        text = "".join(item.parts)
        if item.kind == "function_call":
            return _call_item(item.id, item.call_id, item.name, text, status)
        parts = [] if status == "in_progress" else [_part(item.kind, text)]
        return _text_item(item.kind, item.id, status, parts)


async def stream_events(req: ResponsesRequest, chunks: AsyncIterator[dict[str, Any]], response_id: str,
                        created_at: int | None = None) -> AsyncIterator[bytes]:
    """The Responses SSE events (`event: <type>\\ndata: <json>\\n\\n`) for a chat completion's chunks:
    deltas of content, reasoning_content and tool_calls, a finish_reason, a last chunk with `usage` and no
    choices; an `{"error": {...}}` chunk ends it with response.failed."""
    stream = _ResponseStream(req, response_id, int(time.time()) if created_at is None else created_at)
    yield stream.event("response.created", response=stream.response("in_progress"))
    yield stream.event("response.in_progress", response=stream.response("in_progress"))
    async for chunk in chunks:
        if "error" in chunk:
            for event in stream.fail(chunk["error"]):
                yield event
            return
        if chunk.get("usage"):
            stream.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            for event in stream.feed(choice.get("delta") or {}):
                yield event
            stream.finish_reason = choice.get("finish_reason") or stream.finish_reason
    for event in stream.end():
        yield event
