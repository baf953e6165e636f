"""`pdserve serve` starts Ray, the workers and the router, answers, and SIGTERM stops it all cleanly."""

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from bench.cluster import ROOT, free_port, wait_http


@pytest.mark.slow
def test_serve_answers_and_sigterm_leaves_no_process_behind(demo_gguf):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdserve_cli.main", "serve", "--port", str(port),
                             "--kv-cache-bytes", str(64 << 20)], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=180, proc=proc)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": demo_gguf.stem, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # Ray's processes and the worker actors
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "pdserve: stopped" in out
        time.sleep(2)
        alive = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
