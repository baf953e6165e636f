"""Tool-call parsers on outputs written as each model family writes them: the calls and content read whole,
and the same read from a stream however the text is cut into deltas."""

import json
import random
import re

import pytest

from router.tool_parsers import PARSERS, get_parser, parser_for_template

WEATHER_SF = {"location": "San Francisco, CA", "unit": "fahrenheit"}
WEATHER_TOKYO = {"location": "Tokyo, Japan", "unit": "celsius"}
EVENT = {"title": "Team sync", "attendees": [{"email": "ana@example.com", "optional": False},
                                             {"email": "li@example.com", "optional": True}],
         "recurrence": {"freq": "weekly", "days": ["MO", "TH"], "until": None}, "duration_min": 30.5}

# (family, output, expected content, expected calls as (name, arguments))
CASES = {
    "qwen25_text_then_two_parallel_calls": (
        "hermes",
        "I'll look up the current weather in both cities.\n"
        '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "San Francisco, CA", '
        '"unit": "fahrenheit"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Tokyo, Japan", '
        '"unit": "celsius"}}\n</tool_call>',
        "I'll look up the current weather in both cities.",
        [("get_current_weather", WEATHER_SF), ("get_current_weather", WEATHER_TOKYO)]),
    "hermes2pro_arguments_first": (
        "hermes",
        '<tool_call>\n{"arguments": {"symbol": "TSLA"}, "name": "get_stock_fundamentals"}\n</tool_call>',
        None, [("get_stock_fundamentals", {"symbol": "TSLA"})]),
    "hermes_parameters_key_and_no_arguments": (
        "hermes",
        '<tool_call>\n{"name": "get_time", "parameters": {"tz": "UTC"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "list_files"}\n</tool_call>',
        None, [("get_time", {"tz": "UTC"}), ("list_files", {})]),
    "hermes_unicode_arguments": (
        "hermes",
        '<tool_call>\n{"name": "translate", "arguments": {"text": "Grüß Gott — 你好 👋", '
        '"target": "\\u65e5\\u672c\\u8a9e"}}\n</tool_call>',
        None, [("translate", {"text": "Grüß Gott — 你好 👋", "target": "日本語"})]),
    "hermes_nested_arguments": (
        "hermes",
        '<tool_call>\n{"name": "create_event", "arguments": ' + json.dumps(EVENT) + "}\n</tool_call>",
        None, [("create_event", EVENT)]),
    "hermes_plain_text": (
        "hermes", "The capital of France is Paris.\n\nIt has been since 987.\n",
        "The capital of France is Paris.\n\nIt has been since 987.", []),
    "hermes_mentions_tool_without_a_call": (
        "hermes", "Put the definition in a <tools> element; names starting with <tool_ are reserved.",
        "Put the definition in a <tools> element; names starting with <tool_ are reserved.", []),
    "hermes_malformed_json": (
        "hermes",
        'Calling it now.\n<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Paris"}\n'
        "</tool_call>",
        'Calling it now.\n<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Paris"}\n'
        "</tool_call>", []),
    "hermes_python_dict_is_not_json": (
        "hermes", "<tool_call>\n{'name': 'get_time', 'arguments': {}}\n</tool_call>",
        "<tool_call>\n{'name': 'get_time', 'arguments': {}}\n</tool_call>", []),
    "hermes_second_call_cut_off": (
        "hermes",
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_current_weather", "argu',
        '<tool_call>\n{"name": "get_current_weather", "argu', [("get_time", {"tz": "UTC"})]),
    "hermes_unclosed_complete_call": (
        "hermes", '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n',
        None, [("get_time", {"tz": "UTC"})]),
    "hermes_arguments_as_a_json_string": (
        "hermes", '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}\n</tool_call>',
        None, [("get_time", {"tz": "UTC"})]),
    "hermes_name_not_a_string": (
        "hermes", '<tool_call>\n{"name": null, "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": null, "arguments": {}}\n</tool_call>', []),
    "hermes_text_after_call": (
        "hermes",
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\nI have asked for the time.',
        "I have asked for the time.", [("get_time", {})]),
    "llama31_json": (
        "llama3_json",
        '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", '
        '"unit": "Fahrenheit"}}',
        None, [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})]),
    "llama31_python_tag": (
        "llama3_json",
        '<|python_tag|>{"name": "get_current_conditions", "parameters": {"location": "Paris, France"}}',
        None, [("get_current_conditions", {"location": "Paris, France"})]),
    "llama32_two_calls_semicolon": (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_weather", "parameters": {"city": "London"}}',
        None, [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "London"})]),
    "llama_arguments_key_unicode_nested": (
        "llama3_json",
        '\n{"name": "create_event", "arguments": ' + json.dumps(EVENT | {"title": "Réunion ☕"},
                                                             ensure_ascii=False) + "}",
        None, [("create_event", EVENT | {"title": "Réunion ☕"})]),
    "llama_plain_text": (
        "llama3_json", "It is 18°C and sunny in Paris right now.",
        "It is 18°C and sunny in Paris right now.", []),
    "llama_text_before_json": (
        "llama3_json",
        'Here is the call: {"name": "get_weather", "parameters": {"city": "Paris"}}',
        'Here is the call: {"name": "get_weather", "parameters": {"city": "Paris"}}', []),
    "llama_json_answer_not_a_call": (
        "llama3_json", '{"answer": 42, "unit": "km"}', '{"answer": 42, "unit": "km"}', []),
    "llama_malformed_json": (
        "llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}',
        '{"name": "get_weather", "parameters": {"city": "Paris"}', []),
    "llama_second_call_malformed": (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters": ',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters":', []),
    "llama_call_then_text": (
        "llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}} Let me know if you need more.',
        '{"name": "get_weather", "parameters": {"city": "Paris"}} Let me know if you need more.', []),
    "llama31_builtin_tool_is_not_json": (
        "llama3_json", '<|python_tag|>brave_search.call(query="weather in Menlo Park")',
        '<|python_tag|>brave_search.call(query="weather in Menlo Park")', []),
    "mistral_v3_two_calls": (
        "mistral",
        ' [TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "San Francisco, CA", '
        '"unit": "fahrenheit"}}, {"name": "get_current_weather", "arguments": {"location": "Tokyo, Japan", '
        '"unit": "celsius"}}]',
        None, [("get_current_weather", WEATHER_SF), ("get_current_weather", WEATHER_TOKYO)]),
    "mistral_text_before_calls": (
        "mistral",
        'Let me check that for you.[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "Europe/Paris"}, '
        '"id": "a1B2c3D4e"}]',
        "Let me check that for you.", [("get_time", {"tz": "Europe/Paris"})]),
    "mistral_args_form_two_calls": (
        "mistral",
        '[TOOL_CALLS]get_current_weather[ARGS]{"location": "Tokyo, Japan", "unit": "celsius"}'
        '[TOOL_CALLS]create_event[ARGS]' + json.dumps(EVENT),
        None, [("get_current_weather", WEATHER_TOKYO), ("create_event", EVENT)]),
    "mistral_args_form_call_id_unicode": (
        "mistral", '[TOOL_CALLS]translate[CALL_ID]Xy12Ab34c[ARGS]{"text": "naïve café", "target": "el"}',
        None, [("translate", {"text": "naïve café", "target": "el"})]),
    "mistral_plain_text_mentions_marker": (
        "mistral", "Mistral models write [TOOL_ before a call, but not here.",
        "Mistral models write [TOOL_ before a call, but not here.", []),
    "mistral_malformed_json": (
        "mistral", 'Sure.[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "UTC"}',
        'Sure.[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "UTC"}', []),
}


def _reassemble(deltas: list[dict]) -> tuple[str | None, list[tuple[str, str, str]]]:
    """The content and (id, name, arguments) per call that an OpenAI client builds from the deltas, checking
    each delta's shape on the way."""
    content, calls = [], {}
    for d in deltas:
        if "content" in d:
            assert set(d) == {"content"} and d["content"]
            content.append(d["content"])
            continue
        assert set(d) == {"tool_calls"} and len(d["tool_calls"]) == 1
        c = d["tool_calls"][0]
        if c["index"] not in calls:
            assert c["index"] == len(calls)
            assert set(c) == {"index", "id", "type", "function"} and c["type"] == "function"
            assert re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) and c["function"]["arguments"] == ""
            calls[c["index"]] = [c["id"], c["function"]["name"], ""]
        else:
            assert set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
            calls[c["index"]][2] += c["function"]["arguments"]
    return "".join(content) or None, [tuple(calls[i]) for i in sorted(calls)]


def _cuts(text: str) -> list[list[str]]:
    """The text whole, a character at a time, and cut at random points (seeded)."""
    out = [[text], list(text)]
    for seed in range(6):
        rng = random.Random(seed)
        points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        out.append([text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)])
    return out


@pytest.mark.parametrize("case", CASES)
def test_parse_reads_the_calls_and_content_the_format_defines(case):
    family, text, content, calls = CASES[case]
    got_content, got_calls = get_parser(family).parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    for c in got_calls:
        assert c.arguments == json.dumps(json.loads(c.arguments), ensure_ascii=False)
        assert re.fullmatch(r"call_[0-9a-f]{24}", c.id)


@pytest.mark.parametrize("case", CASES)
def test_streamed_deltas_add_up_to_the_parse_however_the_text_is_cut(case):
    family, text, _, _ = CASES[case]
    parser = get_parser(family)
    content, calls = parser.parse(text)
    for pieces in _cuts(text):
        streamer = parser.streamer()
        deltas = [d for p in pieces for d in streamer.feed(p)] + streamer.finish()
        got_content, got_calls = _reassemble(deltas)
        assert got_content == content, pieces
        assert [(n, json.loads(a)) for _, n, a in got_calls] == [(c.name, json.loads(c.arguments)) for c in calls]
        assert streamer.calls == len(calls)


def test_unicode_arguments_are_not_escaped():
    _, calls = get_parser("hermes").parse(CASES["hermes_unicode_arguments"][1])
    assert "你好 👋" in calls[0].arguments and "日本語" in calls[0].arguments


def test_a_possible_marker_start_is_held_until_it_is_known():
    s = get_parser("hermes").streamer()
    assert s.feed("Checking now. <tool_") == [{"content": "Checking now."}]
    assert s.feed('call>\n{"name": "get_time", "arguments": {}}') == []
    deltas = s.feed("\n</tool_call>")
    assert [d["tool_calls"][0]["function"] for d in deltas] == [{"name": "get_time", "arguments": ""},
                                                                 {"arguments": "{}"}]
    m = get_parser("mistral").streamer()
    assert m.feed("See [TOOL_") == [{"content": "See"}]
    assert m.feed("S] here") == [{"content": " [TOOL_S] here"}]


def test_each_hermes_call_is_sent_when_its_block_closes():
    s = get_parser("hermes").streamer()
    first = s.feed('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "b"')
    assert [d["tool_calls"][0]["index"] for d in first] == [0, 0] and s.calls == 1
    assert s.feed(', "arguments": {}}\n</tool_call>') and s.calls == 2


def test_a_llama_output_that_is_not_json_streams_as_content():
    s = get_parser("llama3_json").streamer()
    assert s.feed("<|py") == []
    assert s.feed("thon is a language") == [{"content": "<|python is a language"}]


QWEN25_TEMPLATE = ('{%- if tools %}{{- "<|im_start|>system\\n" }}{{- "\\n\\n# Tools\\n\\nYou may call one or more '
                   'functions to assist with the user query." }}{{- "\\n</tools>\\n\\nFor each function call, return'
                   ' a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n'
                   '<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>'
                   '<|im_end|>\\n" }}{%- endif %}')
MISTRAL_TEMPLATE = ('{%- if message.tool_calls is defined %}{{- "[TOOL_CALLS][" }}{%- for tool_call in '
                    'message.tool_calls %}{{- tool_call.function|tojson }}{%- endfor %}{{- "]" + eos_token }}'
                    '{%- elif message.role == "tool" %}{{- "[TOOL_RESULTS]" }}')
LLAMA31_TEMPLATE = ('{%- if builtin_tools is defined or tools is not none %}{{- "Environment: ipython\\n" }}'
                    '{%- endif %}{%- if builtin_tools is defined %}{{- "<|python_tag|>" + tool_call.name }}'
                    '{%- elif message.role == "tool" or message.role == "ipython" %}'
                    '{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}')
LLAMA32_TEMPLATE = ('{%- elif message.role == "tool" or message.role == "ipython" %}'
                    '{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}')
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}")


@pytest.mark.parametrize(("template", "family"), [
    (QWEN25_TEMPLATE, "hermes"), (MISTRAL_TEMPLATE, "mistral"), (LLAMA31_TEMPLATE, "llama3_json"),
    (LLAMA32_TEMPLATE, "llama3_json"), (CHATML_TEMPLATE, None), (None, None)])
def test_the_family_is_read_from_the_chat_template(template, family):
    assert parser_for_template(template) == family


def test_an_unknown_parser_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        get_parser("pythonic")
    assert sorted(PARSERS) == ["hermes", "llama3_json", "mistral"]
