"""Anthropic's Messages API over chat completions (router/messages_api.py): requests as the chat requests they
mean, chat output as Messages and stream events that the `anthropic` SDK reads, the events adding up to the
Message the whole answer gives."""

import json
from typing import Any

import anthropic
import httpx2  # the anthropic SDK's HTTP client
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from pydantic import TypeAdapter, ValidationError

from router.chat_output import assemble
from router.messages_api import MessagesRequest, error_body, from_chat, stream_events, to_chat
from router.schemas import ChatCompletionRequest
from tests.router.chat_cases import CASES, PARIS, ROME, USAGE, WEATHER, deltas

EVENTS = TypeAdapter(RawMessageStreamEvent)
TOOLS = [{"name": "get_weather", "description": "The weather now", "input_schema": WEATHER}]


def _chunks(name: str, **finish: Any) -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    choice = {"index": 0, "logprobs": None, "finish_reason": None}
    chunks = [{**base, "choices": [{**choice, "delta": d}]} for d in deltas(name)]
    chunks.append({**base, "choices": [{**choice, "delta": {}, "finish_reason": CASES[name][1], **finish}]})
    return [*chunks, {**base, "choices": [], "usage": USAGE}]


def _chat(name: str, **finish: Any) -> dict[str, Any]:
    """The whole chat.completion the router gives for the same output."""
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": assemble(deltas(name)), "logprobs": None,
                         "finish_reason": CASES[name][1], **finish}], "usage": USAGE}


async def _aiter(items: list[dict[str, Any]]):
    for x in items:
        yield x


async def _events(req: MessagesRequest, chunks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    async for raw in stream_events(req, _aiter(chunks), "msg_abc", prompt_tokens=12):
        head, data, tail = raw.decode().split("\n", 2)
        assert head.startswith("event: ") and data.startswith("data: ") and tail == "\n"
        out.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def _request(**fields: Any) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 64,
                                           "messages": [{"role": "user", "content": "Hi"}], **fields})


def test_a_conversation_with_tool_use_becomes_the_chat_request_it_means():
    req = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 64,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Use metric units."}],
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Two cities.", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "toolu_2",
                 "content": [{"type": "text", "text": "unknown city"}], "is_error": True},
                {"type": "text", "text": "And tomorrow?"}]},
        ],
        "tools": TOOLS, "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["\n\nHuman:"], "temperature": 0.2, "top_p": 0.9, "top_k": 40,
        "metadata": {"user_id": "u1"}, "stream": True, "thinking": {"type": "enabled", "budget_tokens": 1024},
    })
    chat = to_chat(req)
    assert chat == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief.\nUse metric units."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "Checking.", "reasoning_content": "Two cities.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": PARIS}},
                {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": ROME}},
            ]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "unknown city"},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "max_tokens": 64,
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "The weather now",
                                                    "parameters": WEATHER}}],
        "tool_choice": "required", "parallel_tool_calls": False,
        "stop": ["\n\nHuman:"], "temperature": 0.2, "top_p": 0.9, "top_k": 40, "user": "u1",
        "stream": True, "stream_options": {"include_usage": True},
    }
    ChatCompletionRequest.model_validate(chat)  # and the router takes it


@pytest.mark.parametrize(("choice", "chat_choice"), [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
])
def test_tool_choices_become_chat_tool_choices(choice, chat_choice):
    chat = to_chat(_request(tools=TOOLS, tool_choice=choice))
    assert chat["tool_choice"] == chat_choice and "parallel_tool_calls" not in chat
    assert chat["messages"] == [{"role": "user", "content": "Hi"}]
    ChatCompletionRequest.model_validate(chat)


@pytest.mark.parametrize(("fields", "says"), [
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
     "'image' is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}]},
     "'image' is not supported"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "'web_search_20250305' is not supported"),
    ({"max_tokens": None}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "belongs in an assistant message"),
])
def test_images_server_tools_and_malformed_requests_are_refused(fields, says):
    body = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}], **fields}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(ValidationError, match=says):
        MessagesRequest.model_validate(body)


def test_a_chat_answer_in_text_is_a_message_the_sdk_reads():
    m = Message.model_validate(from_chat(_request(), _chat("text"), "msg_abc"))
    assert [(b.type, b.text) for b in m.content] == [("text", "Hello!")]
    assert m.stop_reason == "end_turn" and m.stop_sequence is None and m.id == "msg_abc"
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens, m.usage.output_tokens) == (8, 4, 7)


def test_chat_tool_calls_are_tool_use_blocks():
    m = Message.model_validate(from_chat(_request(tools=TOOLS), _chat("text_and_two_calls"), "msg_abc"))
    assert m.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "id", None), getattr(b, "input", None)) for b in m.content] == [
        ("text", None, None), ("tool_use", "toolu_a", {"city": "Paris"}),
        ("tool_use", "toolu_b", {"city": "Rome"})]


def test_an_answer_cut_by_max_tokens_says_so():
    m = Message.model_validate(from_chat(_request(), _chat("reasoning_cut_short"), "msg_abc"))
    assert m.stop_reason == "max_tokens"
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content] == [
        ("thinking", "The user greets."), ("text", "Hi th")]


def test_a_stop_sequence_is_named_where_known():
    req = _request(stop_sequences=["END", "STOP"])
    # eos or a stop sequence: chat's "stop" does not say which
    assert from_chat(req, _chat("text"), "msg_abc")["stop_reason"] == "end_turn"
    for body in (from_chat(req, _chat("text"), "msg_abc", stop_sequence="STOP"),
                 from_chat(req, _chat("text", stop_reason="STOP"), "msg_abc")):  # vLLM's field
        assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "STOP")
        Message.model_validate(body)


def _accumulate(parsed: list[Any]) -> Any:
    """The message the SDK builds from the events, as `messages.stream(...)` does."""
    snapshot, bufs = None, {}
    for event in parsed:
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    return snapshot


@pytest.mark.parametrize("name", list(CASES))
async def test_stream_events_parse_and_add_up_to_the_whole_message(name):
    req = _request(tools=TOOLS)
    events = await _events(req, _chunks(name))
    parsed = [EVENTS.validate_python(data) for _, data in events]
    assert [kind for kind, _ in events] == [e.type for e in parsed]
    assert parsed[0].type == "message_start"
    assert [e.type for e in parsed[-2:]] == ["message_delta", "message_stop"]
    starts = [e.index for e in parsed if e.type == "content_block_start"]
    stops = [e.index for e in parsed if e.type == "content_block_stop"]
    assert starts == stops == list(range(len(starts)))
    whole = Message.model_validate(from_chat(req, _chat(name), "msg_abc"))
    assert Message.model_validate(_accumulate(parsed).to_dict()) == whole


async def test_a_stop_sequence_named_on_the_last_chunk_ends_the_stream():
    req = _request(stop_sequences=["STOP"])
    events = await _events(req, _chunks("text", stop_reason="STOP"))
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}


async def test_an_error_chunk_becomes_an_error_event_and_ends_the_stream():
    chunks = _chunks("text")[:2] + [{"error": {"message": "no free KV blocks", "type": "service_unavailable",
                                              "param": None, "code": "kv_cache_full"}}, *_chunks("text")[2:]]
    events = await _events(_request(), chunks)
    assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error",
                                                               "message": "no free KV blocks"}})
    ErrorResponse.model_validate(events[-1][1])


@pytest.mark.parametrize(("status", "kind"), [(400, "invalid_request_error"), (401, "authentication_error"),
                                              (403, "permission_error"), (404, "not_found_error"),
                                              (422, "invalid_request_error"), (429, "rate_limit_error"),
                                              (500, "api_error"), (502, "api_error"),
                                              (503, "overloaded_error"), (504, "timeout_error")])
def test_error_bodies_are_anthropics_by_status(status, kind):
    body = error_body(status, "went wrong")
    assert body == {"type": "error", "error": {"type": kind, "message": "went wrong"}}
    ErrorResponse.model_validate(body)


def _client(name: str) -> anthropic.AsyncAnthropic:
    """The SDK's client against the module, over httpx2's in-process transport."""
    async def handle(request: httpx2.Request) -> httpx2.Response:
        req = MessagesRequest.model_validate_json(request.content)
        if not req.stream:
            return httpx2.Response(200, json=from_chat(req, _chat(name), "msg_abc"))
        return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                              content=stream_events(req, _aiter(_chunks(name)), "msg_abc"))

    return anthropic.AsyncAnthropic(api_key="-", base_url="http://router",
                                    http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handle)))


async def test_the_sdk_client_reads_whole_and_streamed_messages():
    client = _client("text_and_two_calls")
    ask = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "Weather?"}],
           "tools": TOOLS}
    whole = await client.messages.create(**ask)
    assert [b.type for b in whole.content] == ["text", "tool_use", "tool_use"]
    assert whole.stop_reason == "tool_use"
    async with client.messages.stream(**ask) as stream:
        final = await stream.get_final_message()
    assert Message.model_validate(final.to_dict()) == whole
