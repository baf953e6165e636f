"""Traces across the request path (issue 39): a real `pdserve serve` (router, prefill worker and decode worker in
three processes) with `--otlp-endpoint` pointing at an OTLP/HTTP collector run by this test, which keeps the
spans it receives in memory. A request prefilled remotely is one trace: the router's request span with its
tokenize, admission and route spans; under it the prefill worker's (queue, compute) and the decode worker's
(waiting for its KV, first token, end); under the decode worker's, the KV transfer the prefill worker ran.
The W3C trace context crosses the processes in the internal API's messages."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from bench.cluster import embedded_cluster

pytestmark = pytest.mark.slow


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
def traced(demo_gguf):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    # Every prompt prefilled on the prefill worker (none is short enough to stay on the decode worker).
    with embedded_cluster("--otlp-endpoint", endpoint, "--local-prefill-tokens", "0") as (url, _):
        yield url, demo_gguf.stem
    server.shutdown()


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


def test_a_request_is_one_trace_across_router_prefill_and_decode(traced):
    url, model = traced
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Trace this request through every process, please."}]})
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


def test_a_streamed_request_is_traced_to_its_end(traced):
    url, model = traced
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 6, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Stream a short answer about traces, please."}]}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    rid = lines[0].split('"id":"', 1)[1].split('"', 1)[0]
    spans = _trace_of(rid)
    root = next(s for s in spans if s["name"] == "pdserve.request")
    assert root["attrs"]["pdserve.stream"] is True and not root["error"]
    decode = next(s for s in spans if s["name"] == "pdserve.decode")
    assert decode["parent"] == root["id"] and decode["end"] <= root["end"]
