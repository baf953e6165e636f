"""Chat stream deltas, as router/chat_output.py's reader sends them, that the Responses and Messages
translation tests (test_responses_api.py, test_messages_api.py) feed their stream translators."""

from typing import Any

USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19,
         "prompt_tokens_details": {"cached_tokens": 4}}
PARIS, ROME = '{"city": "Paris"}', '{"city": "Rome"}'
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def _call(index: int, call_id: str, name: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}


def _args(index: int, text: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}


# (deltas after the first, finish reason)
CASES = {
    "text": ([{"content": "Hel"}, {"content": "lo!"}], "stop"),
    "tool_call": ([_call(0, "call_a", "get_weather"), _args(0, '{"city": '), _args(0, '"Paris"}')],
                  "tool_calls"),
    "text_and_two_calls": ([{"content": "Checking "}, {"content": "both."}, _call(0, "call_a", "get_weather"),
                            _args(0, '{"city": "Paris"}'), _call(1, "call_b", "get_weather"),
                            _args(1, '{"city": '), _args(1, '"Rome"}')], "tool_calls"),
    "reasoning_cut_short": ([{"reasoning_content": "The user "}, {"reasoning_content": "greets."},
                             {"content": "Hi th"}], "length"),
}


def deltas(name: str) -> list[dict[str, Any]]:
    """The case's deltas, the first with the assistant's role."""
    ds, _ = CASES[name]
    return [{"role": "assistant", **ds[0]}, *ds[1:]]
