"""OpenAI's Responses API over chat completions (router/responses_api.py): requests as the chat requests they
mean, chat output as Response objects and stream events that the `openai` SDK reads, the stream ending with
the object the whole answer gives."""

import json
from typing import Any

import httpx
import openai
import pytest
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from router.chat_output import assemble
from router.responses_api import ResponsesRequest, from_chat, stream_events, to_chat
from router.schemas import ChatCompletionRequest
from tests.router.chat_cases import CASES, PARIS, ROME, USAGE, WEATHER, deltas

EVENTS = TypeAdapter(ResponseStreamEvent)
CREATED = 1_760_000_000
def _chunks(name: str) -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": CREATED, "model": "m"}
    choice = {"index": 0, "logprobs": None, "finish_reason": None}
    chunks = [{**base, "choices": [{**choice, "delta": d}]} for d in deltas(name)]
    chunks.append({**base, "choices": [{**choice, "delta": {}, "finish_reason": CASES[name][1]}]})
    return [*chunks, {**base, "choices": [], "usage": USAGE}]


def _chat(name: str) -> dict[str, Any]:
    """The whole chat.completion the router gives for the same output."""
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": CREATED, "model": "m",
            "choices": [{"index": 0, "message": assemble(deltas(name)), "logprobs": None,
                         "finish_reason": CASES[name][1]}], "usage": USAGE}


async def _aiter(items: list[dict[str, Any]]):
    for x in items:
        yield x


async def _events(req: ResponsesRequest, chunks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    async for raw in stream_events(req, _aiter(chunks), "resp_abc", created_at=CREATED):
        head, data, tail = raw.decode().split("\n", 2)
        assert head.startswith("event: ") and data.startswith("data: ") and tail == "\n"
        out.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def _request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "Hi", **fields})


TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather now", "parameters": WEATHER,
          "strict": True}]


def test_a_conversation_with_tool_calls_becomes_the_chat_request_it_means():
    req = ResponsesRequest.model_validate({
        "model": "m", "instructions": "Be brief.",
        "input": [
            {"role": "developer", "content": "Use metric units."},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Weather in Paris"},
                         {"type": "input_text", "text": "and Rome?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [],
             "content": [{"type": "reasoning_text", "text": "Two cities."}]},
            {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
             "arguments": PARIS, "status": "completed"},
            {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": ROME},
            {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
            {"type": "function_call_output", "call_id": "call_2",
             "output": [{"type": "input_text", "text": "21C"}]},
        ],
        "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False, "max_output_tokens": 64,
        "temperature": 0.2, "top_p": 0.9, "seed": 7, "user": "u1", "store": False, "stream": True,
        "text": {"format": {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}},
        "metadata": {"k": "v"}, "reasoning": {"effort": "low"}, "truncation": "auto",
    })
    chat = to_chat(req)
    assert chat == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Use metric units."},
            {"role": "user", "content": "Weather in Paris\nand Rome?"},
            {"role": "assistant", "content": "Checking.", "reasoning_content": "Two cities.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": ROME}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "The weather now",
                                                    "parameters": WEATHER, "strict": True}}],
        "tool_choice": "auto", "parallel_tool_calls": False,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}},
        "max_completion_tokens": 64, "temperature": 0.2, "top_p": 0.9, "seed": 7, "user": "u1",
        "stream": True, "stream_options": {"include_usage": True},
    }
    ChatCompletionRequest.model_validate(chat)  # and the router takes it


def test_a_string_input_is_one_user_message_and_a_named_tool_a_named_function():
    chat = to_chat(_request(tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"},
                            text={"format": {"type": "json_object"}}))
    assert chat == {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                    "tools": [{"type": "function", "function": {
                        "name": "get_weather", "description": "The weather now", "parameters": WEATHER,
                        "strict": True}}],
                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                    "parallel_tool_calls": True, "response_format": {"type": "json_object"}}
    ChatCompletionRequest.model_validate(chat)
    assert to_chat(_request()) == {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                                   "parallel_tool_calls": True}


@pytest.mark.parametrize("fields", [{"store": True}, {"previous_response_id": "resp_1"},
                                    {"conversation": "conv_1"}, {"background": True}])
def test_requests_that_need_stored_state_are_refused(fields):
    with pytest.raises(ValidationError, match="stateless"):
        _request(**fields)


@pytest.mark.parametrize(("fields", "says"), [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "'input_image' is not supported"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "'item_reference' is not supported"),
    ({"tools": [{"type": "web_search"}]}, "'web_search' is not supported"),
])
def test_images_references_and_hosted_tools_are_refused_by_name(fields, says):
    with pytest.raises(ValidationError, match=says):
        _request(**fields)


def test_a_chat_answer_in_text_is_a_response_the_sdk_reads():
    body = from_chat(_request(), _chat("text"), "resp_abc")
    r = Response.model_validate(body)
    assert r.output_text == "Hello!" and r.status == "completed" and r.incomplete_details is None
    assert [(o.type, o.id, o.status) for o in r.output] == [("message", "msg_abc_0", "completed")]
    assert r.usage.input_tokens == 12 and r.usage.output_tokens == 7 and r.usage.total_tokens == 19
    assert r.usage.input_tokens_details.cached_tokens == 4 and r.created_at == CREATED
    assert "output_text" not in body


def test_chat_tool_calls_are_function_call_items():
    r = Response.model_validate(from_chat(_request(tools=TOOLS), _chat("text_and_two_calls"), "resp_abc"))
    assert r.output_text == "Checking both."
    calls = [(o.type, o.id, o.call_id, o.name, json.loads(o.arguments)) for o in r.output[1:]]
    assert calls == [("function_call", "fc_abc_1", "call_a", "get_weather", {"city": "Paris"}),
                     ("function_call", "fc_abc_2", "call_b", "get_weather", {"city": "Rome"})]
    assert r.tools[0].name == "get_weather" and r.tool_choice == "auto"


def test_an_answer_cut_by_the_output_limit_is_incomplete():
    body = from_chat(_request(max_output_tokens=5), _chat("reasoning_cut_short"), "resp_abc")
    r = Response.model_validate(body)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [(o.type, o.status) for o in r.output] == [("reasoning", "completed"), ("message", "incomplete")]
    assert r.output[0].content[0].text == "The user greets." and r.output_text == "Hi th"


@pytest.mark.parametrize("name", list(CASES))
async def test_stream_events_parse_and_end_with_the_whole_response(name):
    req = _request(tools=TOOLS)
    events = await _events(req, _chunks(name))
    parsed = [EVENTS.validate_python(data) for _, data in events]
    assert [kind for kind, _ in events] == [e.type for e in parsed]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    assert [e.type for e in parsed[:2]] == ["response.created", "response.in_progress"]
    final = events[-1][1]
    assert final["type"] == ("response.incomplete" if CASES[name][1] == "length" else "response.completed")
    assert final["response"] == from_chat(req, _chat(name), "resp_abc")
    Response.model_validate(final["response"])

    state = ResponseStreamState(input_tools=TOOLS, text_format=openai.omit)  # the SDK's own accumulator
    for e in parsed:
        state.handle_event(e)
    if name != "reasoning_cut_short":  # the SDK completes a response on response.completed only
        assert state._completed_response.output_text == Response.model_validate(final["response"]).output_text


async def test_stream_items_open_and_close_in_order():
    events = await _events(_request(), _chunks("text_and_two_calls"))
    kinds = [(kind, data.get("output_index")) for kind, data in events]
    assert kinds == [
        ("response.created", None), ("response.in_progress", None),
        ("response.output_item.added", 0), ("response.content_part.added", 0),
        ("response.output_text.delta", 0), ("response.output_text.delta", 0),
        ("response.output_text.done", 0), ("response.content_part.done", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.done", 1), ("response.output_item.done", 1),
        ("response.output_item.added", 2), ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.delta", 2), ("response.function_call_arguments.done", 2),
        ("response.output_item.done", 2), ("response.completed", None),
    ]


async def test_an_error_chunk_fails_the_response_and_ends_the_stream():
    error = {"error": {"message": "worker lost", "type": "server_error", "param": None, "code": None}}
    chunks = [*_chunks("text")[:3], error, *_chunks("text")[3:]]
    events = await _events(_request(), chunks)
    parsed = [EVENTS.validate_python(data) for _, data in events]
    failed = parsed[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert (failed.response.error.code, failed.response.error.message) == ("server_error", "worker lost")
    assert failed.response.output[0].status == "incomplete" and failed.response.output_text == "Hello!"
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))


def _client(name: str) -> openai.AsyncOpenAI:
    """The SDK's client against the module, over httpx's in-process transport."""
    async def handle(request: httpx.Request) -> httpx.Response:
        req = ResponsesRequest.model_validate_json(request.content)
        if not req.stream:
            return httpx.Response(200, json=from_chat(req, _chat(name), "resp_abc"))
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=stream_events(req, _aiter(_chunks(name)), "resp_abc"))

    return openai.AsyncOpenAI(api_key="-", base_url="http://router/v1",
                              http_client=httpx.AsyncClient(transport=httpx.MockTransport(handle)))


async def test_the_sdk_client_reads_whole_and_streamed_responses():
    client = _client("text_and_two_calls")
    whole = await client.responses.create(model="m", input="Weather?", tools=TOOLS)
    assert whole.output_text == "Checking both."
    assert [o.type for o in whole.output] == ["message", "function_call", "function_call"]
    async with client.responses.stream(model="m", input="Weather?", tools=TOOLS) as stream:
        final = await stream.get_final_response()
    assert final.output_text == whole.output_text and final.usage == whole.usage
    assert [(o.type, o.id) for o in final.output] == [(o.type, o.id) for o in whole.output]
    events = [e.type async for e in await client.responses.create(model="m", input="Weather?", stream=True)]
    assert events[-1] == "response.completed"
