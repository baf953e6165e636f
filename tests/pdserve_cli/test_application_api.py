"""What applications send, through the official `openai` and `anthropic` clients against a real `pdserve serve`
(the demo model, one prefill and one decode worker): structured outputs on 22 JSON Schemas, forced tool calls,
completions with prompt lists, echo and logit_bias, the Responses and Messages APIs, streamed and whole. Traces
are on (issue 39): a request prefilled remotely is one trace over the three processes, its W3C context carried
in the internal API's messages, each process's spans exported to an OTLP/HTTP collector this module runs."""

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import httpx
import jsonschema
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from bench.cluster import embedded_cluster
from bench.json_schemas import SCHEMAS

# A long system prompt: over the router's local-prefill threshold, so these requests take the disaggregated
# path (the first token sampled on the prefill worker, under the grammar).
LONG = "You are a careful assistant. " * 12

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                              "parameters": {"type": "object", "properties": {
                                                  "city": {"type": "string", "maxLength": 20},
                                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                  "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"],
    "additionalProperties": False}}}


class _Collector(BaseHTTPRequestHandler):
    spans: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in s.attributes}
                    _Collector.spans.append({
                        "service": service, "name": s.name, "trace": s.trace_id.hex(), "id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex() or None, "attrs": attrs,
                        "events": [e.name for e in s.events], "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano, "error": s.status.code == 2})
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(demo_gguf):
    """The cluster, with traces on: its processes export them to an OTLP/HTTP collector run here."""
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    with embedded_cluster("--tool-call-parser", "hermes", "--otlp-endpoint", endpoint) as (url, _):
        yield url, demo_gguf.stem
    collector.shutdown()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(oai, model, text: str, long: bool = False, **kw):
    messages = ([{"role": "system", "content": LONG}] if long else []) + [{"role": "user", "content": text}]
    kw.setdefault("temperature", 0)
    return oai.chat.completions.create(model=model, messages=messages, max_tokens=160, **kw)


def _schema_format(i: int) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}}


def test_every_json_schema_answer_validates(server, oai):
    for i, schema in enumerate(SCHEMAS):
        r = _chat(oai, server[1], f"Example {i} as JSON, please.", long=i % 2 == 1, response_format=_schema_format(i))
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (i, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_streamed_seeded_and_n_answers_validate_too(server, oai):
    schema = SCHEMAS[6]
    stream = _chat(oai, server[1], "An order as JSON.", long=True, response_format=_schema_format(6), stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)
    whole = _chat(oai, server[1], "An order as JSON.", long=True, response_format=_schema_format(6))
    assert whole.choices[0].message.content == text
    seeded = [_chat(oai, server[1], "A person.", response_format=_schema_format(0), temperature=1.0, seed=5, n=2)
              for _ in range(2)]
    assert [c.message.content for c in seeded[0].choices] == [c.message.content for c in seeded[1].choices]
    for c in seeded[0].choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMAS[0])


def test_json_object_mode_and_other_grammars(server, oai):
    r = _chat(oai, server[1], "Give me a JSON object with a name and an age.", response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = _chat(oai, server[1], "Is water wet?", extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")
    r = _chat(oai, server[1], "A date?", extra_body={"structured_outputs": {"regex": "20[0-9]{2}-0[1-9]-[12][0-9]"}})
    assert len(r.choices[0].message.content) == 10


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_that_cannot_be_built_is_a_400_naming_it(server, oai, stream):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"$ref": "#/nowhere"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        _chat(oai, server[1], "x", response_format=bad, stream=stream)
    assert "nowhere" in e.value.message and e.value.body["param"] == "response_format"


def test_a_named_tool_choice_always_gives_a_valid_call_streamed_or_not(server, oai):
    params = WEATHER["function"]["parameters"]
    kw = dict(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for prompt in ("Weather in Paris?", "Is it cold in Oslo?", "Tell me a joke."):
        r = _chat(oai, server[1], prompt, **kw)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), params)
        chunks = list(_chat(oai, server[1], prompt, stream=True, **kw))
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert deltas[0].id and deltas[0].function.name == "get_weather"
        assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_tool_choice_gives_valid_calls_and_tool_results_go_back_through_the_template(server, oai):
    r = _chat(oai, server[1], "What time is it in Tokyo?", tools=[WEATHER, TIME], tool_choice="required",
              parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
    tool = WEATHER if calls[0].function.name == "get_weather" else TIME
    jsonschema.validate(json.loads(calls[0].function.arguments), tool["function"]["parameters"])
    messages = [{"role": "user", "content": "What time is it in Tokyo?"},
                {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
                {"role": "tool", "tool_call_id": calls[0].id, "content": "09:00"}]
    again = oai.chat.completions.create(model=server[1], messages=messages, tools=[WEATHER, TIME], max_tokens=16,
                                        temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_completions_take_prompt_lists_echo_and_logit_bias(server, oai):
    prompts = ["The capital of France is", "One, two, three,", "Water boils at"]
    many = oai.completions.create(model=server[1], prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in many.choices] == list(range(6))
    for i, p in enumerate(prompts):
        one = oai.completions.create(model=server[1], prompt=p, max_tokens=6, temperature=0)
        assert many.choices[2 * i].text == many.choices[2 * i + 1].text == one.choices[0].text
    echoed = oai.completions.create(model=server[1], prompt=prompts[0], max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompts[0] + many.choices[0].text
    streamed = oai.completions.create(model=server[1], prompt=prompts[0], max_tokens=6, temperature=0, echo=True,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text
    ids = httpx.post(f"{server[0]}/tokenize", json={"model": server[1], "prompt": many.choices[0].text}).json()["tokens"]
    banned = oai.completions.create(model=server[1], prompt=prompts[0], max_tokens=6, temperature=0,
                                    logit_bias={str(ids[0]): -100})
    assert banned.choices[0].text != many.choices[0].text


def test_echo_with_logprobs_scores_the_prompt(server, oai, demo_hf):
    """The prompt's tokens and logprobs head the completion's (the first with none, as OpenAI), equal to
    transformers' on the same weights, whether the decode worker prefilled it or a prefill worker did (the
    long prompt); streamed, the same tokens and numbers."""
    import torch

    hf_model, _ = demo_hf
    for prompt in ["The capital of France is", LONG + "The capital of France is"]:
        ids = httpx.post(f"{server[0]}/tokenize", json={"model": server[1], "prompt": prompt}).json()["tokens"]
        whole = oai.completions.create(model=server[1], prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                       logprobs=2)
        plain = oai.completions.create(model=server[1], prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
        choice, lp = whole.choices[0], whole.choices[0].logprobs
        assert choice.text == prompt + plain.choices[0].text
        assert lp.tokens[len(ids):] == plain.choices[0].logprobs.tokens
        # (the plain run read the prompt's KV from the cache: computed in another shape, rounded differently)
        assert lp.token_logprobs[len(ids):] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        got = lp.token_logprobs[1 : len(ids)]
        assert got == pytest.approx([ref[i, t].item() for i, t in enumerate(ids[1:])], abs=1e-4)
        for i, top in enumerate(lp.top_logprobs[1 : len(ids)]):
            assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(ref[i].max().item(), abs=1e-4)
        chunks = [c.choices[0] for c in oai.completions.create(
            model=server[1], prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2, stream=True)
            if c.choices]
        assert "".join(c.text for c in chunks) == choice.text
        assert sum((c.logprobs.tokens for c in chunks), []) == lp.tokens
        assert sum((c.logprobs.token_logprobs for c in chunks), []) == lp.token_logprobs
        assert sum((c.logprobs.text_offset for c in chunks), []) == lp.text_offset


def test_the_responses_api_streamed_and_whole(server, oai):
    kw = dict(model=server[1], instructions="Answer briefly.", input="What is the capital of France?",
              max_output_tokens=24, temperature=0)
    whole = oai.responses.create(**kw)
    assert whole.status in ("completed", "incomplete") and whole.output_text
    events = list(oai.responses.create(stream=True, **kw))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    formatted = oai.responses.create(model=server[1], input="A person as JSON.", temperature=0, text={"format": {
        "type": "json_schema", "name": "p", "schema": SCHEMAS[0], "strict": True}})
    jsonschema.validate(json.loads(formatted.output_text), SCHEMAS[0])
    forced = oai.responses.create(model=server[1], input="Weather in Rome?", temperature=0, tool_choice={
        "type": "function", "name": "get_weather"}, tools=[{"type": "function", **WEATHER["function"]}])
    call = next(o for o in forced.output if o.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(store=True, **kw)


def test_the_messages_api_through_anthropics_client(server):
    client = anthropic.Anthropic(base_url=server[0], api_key="unused", max_retries=0, timeout=120)
    greedy = {"extra_body": {"temperature": 0}}  # (this SDK takes no temperature argument)
    kw = dict(model=server[1], max_tokens=24, system="Answer briefly.", **greedy,
              messages=[{"role": "user", "content": "What is the capital of France?"}])
    whole = client.messages.create(**kw)
    assert whole.content[0].type == "text" and whole.content[0].text
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert final.stop_reason == whole.stop_reason
    # A stop sequence the answer reaches: the text ends before it, and the Message names it (whole, streamed)
    text = whole.content[0].text
    word = text.split()[1]
    with client.messages.stream(stop_sequences=["zzzz", word], **kw) as stream:
        streamed = stream.get_final_message()
    for stopped in (client.messages.create(stop_sequences=["zzzz", word], **kw), streamed):
        assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", word)
        assert stopped.content[0].text == text[: text.index(word)]
    tool = {"name": "get_weather", "description": "The weather in a city.",
            "input_schema": WEATHER["function"]["parameters"]}
    forced = client.messages.create(model=server[1], max_tokens=64, tools=[tool], **greedy,
                                    tool_choice={"type": "tool", "name": "get_weather"},
                                    messages=[{"role": "user", "content": "Weather in Rome?"}])
    use = next(b for b in forced.content if b.type == "tool_use")
    assert forced.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, tool["input_schema"])
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=server[1], max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"


# --- traces (issue 39): one trace across the router, prefill and decode processes ---


def _uncached(text: str) -> str:
    """A prompt no worker has seen, longer than the local-prefill threshold: prefilled on the prefill worker."""
    return f"{text} ({uuid.uuid4().hex}) " + " ".join(f"item{i}" for i in range(60))


def _trace_of(rid_prefix: str, timeout_s: float = 30.0) -> list[dict]:
    """The spans of the trace whose router span names this request, once every process's have come."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        roots = [s for s in _Collector.spans if s["name"] == "pdserve.request"
                 and str(s["attrs"].get("pdserve.request_id", "")).startswith(rid_prefix)]
        if roots:
            spans = [s for s in _Collector.spans if s["trace"] == roots[0]["trace"]]
            if {"pdserve.kv_transfer", "pdserve.decode", "pdserve.prefill"} <= {s["name"] for s in spans}:
                return spans
        time.sleep(0.2)
    raise AssertionError(f"no whole trace for {rid_prefix}: {[(s['service'], s['name']) for s in _Collector.spans]}")


def test_a_request_is_one_trace_across_router_prefill_and_decode(server):
    url, model = server
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": _uncached("Trace this request through every process.")}]})
    assert r.status_code == 200, r.text
    spans = _trace_of(r.json()["id"])
    by_name = {s["name"]: s for s in spans}
    assert {s["service"] for s in spans} == {"pdserve-router", "pdserve-prefill", "pdserve-decode"}
    root = by_name["pdserve.request"]
    assert root["parent"] is None and root["service"] == "pdserve-router" and not root["error"]
    assert root["attrs"]["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    for name in ("pdserve.tokenize", "pdserve.admission", "pdserve.route", "pdserve.prefill", "pdserve.decode"):
        assert by_name[name]["parent"] == root["id"], name
    route = by_name["pdserve.route"]["attrs"]
    prefill, decode = by_name["pdserve.prefill"], by_name["pdserve.decode"]
    assert prefill["service"] == "pdserve-prefill" and decode["service"] == "pdserve-decode"
    assert route["pdserve.prefill_worker"] and route["pdserve.decode_worker"]
    assert prefill["attrs"]["pdserve.worker"].startswith("prefill-") and decode["attrs"]["pdserve.worker"].startswith("decode-")
    for name in ("pdserve.prefill.queue", "pdserve.prefill.compute"):
        assert by_name[name]["parent"] == prefill["id"] and by_name[name]["service"] == "pdserve-prefill"
    assert by_name["pdserve.prefill.queue"]["end"] <= by_name["pdserve.prefill.compute"]["start"] + 1
    assert "pdserve.cached_tokens" in by_name["pdserve.prefill.compute"]["attrs"]
    # The KV transfer: run by the prefill worker, under the decode worker's span that asked for it.
    transfer = by_name["pdserve.kv_transfer"]
    assert transfer["service"] == "pdserve-prefill" and transfer["parent"] == decode["id"]
    assert transfer["attrs"]["pdserve.bytes_moved"] > 0 and transfer["attrs"]["pdserve.blocks"] > 0
    assert by_name["pdserve.decode.wait_kv"]["parent"] == decode["id"]
    assert "first_token" in decode["events"]
    assert decode["attrs"]["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    assert root["start"] <= prefill["start"] and decode["end"] <= root["end"]


def test_a_streamed_request_is_traced_to_its_end(server):
    url, model = server
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 6, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": _uncached("Stream a short answer about traces.")}]}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    rid = lines[0].split('"id":"', 1)[1].split('"', 1)[0]
    spans = _trace_of(rid)
    root = next(s for s in spans if s["name"] == "pdserve.request")
    assert root["attrs"]["pdserve.stream"] is True and not root["error"]
    decode = next(s for s in spans if s["name"] == "pdserve.decode")
    assert decode["parent"] == root["id"] and decode["end"] <= root["end"]
