"""The benchmark harness measures what a server really does, replays workloads exactly, and plots."""

import asyncio
import json
import subprocess
import sys

import pytest

from bench.loadgen import arrivals, run_workload, summarize
from bench.mock_server import start_in_thread
from bench.workloads import load, make, read_sharegpt, save


@pytest.fixture(scope="module")
def mock_url():
    _, port = start_in_thread(ttft_s=0.15, itl_s=0.03)
    return f"http://127.0.0.1:{port}"


def test_loadgen_reports_ttft_and_itl_of_a_server_with_known_delays(mock_url):
    work = make("fixed", 12, seed=1, input_len=20, output_len=10)
    results, wall = asyncio.run(run_workload(mock_url, "mock", work, rate=20.0, kind="constant"))
    s = summarize(results, wall, ttft_slo_s=0.2, tpot_slo_s=0.04)
    assert s["ok"] == 12 and s["errors"] == 0 and s["errors_by_status"] == {}
    assert s["ttft_p50_ms"] == pytest.approx(150, abs=25)
    assert s["itl_p50_ms"] == pytest.approx(30, abs=8)
    assert s["e2e_p50_ms"] == pytest.approx(150 + 9 * 30, rel=0.15)
    assert all(r.output_tokens == 10 and r.prompt_tokens == 20 for r in results)
    assert s["slo_attainment"] == 1.0
    strict = summarize(results, wall, ttft_slo_s=0.1, tpot_slo_s=0.04)
    assert strict["slo_attainment"] == 0.0  # every TTFT is 150 ms


def test_multi_turn_sessions_replay_turns_in_order_with_answers(mock_url):
    work = make("prefix", 24, seed=3)
    results, _ = asyncio.run(run_workload(mock_url, "mock", work, rate=None))
    assert len(results) == sum(len(s["turns"]) for s in work)
    assert all(r.text == " x" * r.output_tokens for r in results)


def test_load_from_several_processes_replays_every_session(mock_url):
    work = make("prefix", 24, seed=4)
    results, _ = asyncio.run(run_workload(mock_url, "mock", work, rate=50.0, procs=2))
    assert len(results) == sum(len(s["turns"]) for s in work)
    assert all(r.error is None and r.text == " x" * r.output_tokens for r in results)
    assert [r.done_at for r in results] == sorted(r.done_at for r in results)


def _sse_server() -> int:
    """A server whose first answer packs two events into one chunk and splits another across chunks, and
    whose second answer (same connection) is a 400 with a JSON body."""
    import socket
    import threading

    events = [b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\ndata: {"cho',
              b'ices":[{"text":"c"}]}\n\n',
              b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3}}\n\ndata: [DONE]\n\n']
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        f = conn.makefile("rb")
        for answer in range(2):
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            f.read(length)
            if answer == 0:
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                for e in events:
                    conn.sendall(b"%x\r\n%s\r\n" % (len(e), e))
                conn.sendall(b"0\r\n\r\n")
            else:
                body = b'{"error": {"message": "bad prompt", "type": "invalid_request_error"}}'
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def test_events_packed_into_one_chunk_or_split_across_chunks_are_each_counted():
    port = _sse_server()
    work = [{"kind": "completion", "session": str(i), "prompt": [5, 6, 7], "max_tokens": 3} for i in range(2)]
    results, _ = asyncio.run(run_workload(f"http://127.0.0.1:{port}", "m", work, rate=None, kind="burst",
                                          concurrency=1))
    ok, bad = results
    assert ok.error is None and ok.text == "abc" and len(ok.itls_s) == 2 and ok.output_tokens == 3
    assert bad.status == 400 and "bad prompt" in bad.error and bad.ttft_s is None


def test_workloads_are_reproducible_from_their_seed(tmp_path):
    for name in ("prefix", "fixed", "long"):
        a, b = make(name, 8, seed=5), make(name, 8, seed=5)
        assert a == b and a != make(name, 8, seed=6)
    a = make("sharegpt", 20, seed=2)
    assert a == make("sharegpt", 20, seed=2) and 1 < max(len(s["turns"]) for s in a) <= 4
    save(a, tmp_path / "w.jsonl")
    assert load(tmp_path / "w.jsonl") == a
    assert arrivals(5, 2.0, "poisson", 1) == arrivals(5, 2.0, "poisson", 1)


def test_sharegpt_file_is_read_object_by_object_despite_its_cut():
    count = sum(1 for _ in read_sharegpt())
    assert 17_000 < count < 18_000


def test_compare_writes_a_table_and_plots(mock_url, tmp_path):
    out = tmp_path / "r.jsonl"
    for rate in ("10", "40"):
        subprocess.run([sys.executable, "-m", "bench.run", "--url", mock_url, "--workload", "fixed", "--num", "8",
                        "--output-len", "4", "--rate", rate, "--label", "mock", "--out", str(out)], check=True,
                       capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rate"] for r in rows] == [10.0, 40.0] and len(rows[0]["per_request"]["ttft_s"]) == 8
    subprocess.run([sys.executable, "-m", "bench.compare", str(out), "--out", str(tmp_path / "cmp")], check=True,
                   capture_output=True)
    assert (tmp_path / "cmp" / "table.md").read_text().count("| mock |") == 2
    for png in ("latency_cdf.png", "goodput_vs_rate.png"):
        assert (tmp_path / "cmp" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
