"""A decode worker's token streams over HTTP (CPU; JSON lines): how much CPU the worker process spends a
streamed token, and how many tokens a second it gets out, with a stub engine (--step-ms a step, one token for
every running request) behind the real decode worker app and hundreds of raw-socket streams in front.

Both ways in one run, each in a fresh worker process: POST /generate answered by `DecodeApp` in plain ASGI
(what the worker does), against the same stream served through FastAPI's route (middleware stack and
StreamingResponse on every write, the way before). The worker's CPU time is read from the OS, so a client
sharing the machine does not count against it.

  python -m bench.decode_http [--requests 256] [--step-ms 5] [--tokens 100]
"""

import asyncio
import json
import multiprocessing as mp
import time
from types import SimpleNamespace

import numpy as np
import psutil

from bench.cluster import wait_http
from bench.common import emit
from bench.engine_delivery import TokenGaps, stub_args
from pdserve_cli.main import free_port


def _serve(port: int, step_ms: float, tokens: int, plain_asgi: bool) -> None:
    import uvicorn

    from bench.engine_delivery import StubEngine
    from decode_worker.app import create_app
    from engine.async_engine import AsyncEngine
    from protocol.asgi import server_options

    config = SimpleNamespace(name="bench", role="decode", transfer_timeout_s=5.0, internal_token=None)
    rt = SimpleNamespace(engine=AsyncEngine(StubEngine(step_ms / 1e3, tokens)), config=config, descriptor=None,
                         descriptors=[])
    app = create_app(rt)
    uvicorn.run(app if plain_asgi else app.api, host="127.0.0.1", port=port, **server_options("warning"))


async def _streams(port: int, requests: int, tokens: int) -> tuple[int, list[float]]:
    seen = TokenGaps()

    async def one(i: int) -> None:
        arrived = seen.stream()
        body = json.dumps({"request_id": f"r{i}", "prompt_token_ids": [1, 2, 3],
                           "params": {"max_tokens": tokens}}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /generate HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n" % len(body) + body)
        while data := await reader.read(65536):
            if n := data.count(b'"token_ids"'):
                arrived(n)
            if b'"finished":true' in data:
                break
        writer.close()

    await asyncio.gather(*(one(i) for i in range(requests)))
    return seen.tokens, seen.gaps


def measure(plain_asgi: bool, requests: int, step_ms: float, tokens: int) -> dict:
    port = free_port()
    proc = mp.get_context("spawn").Process(target=_serve, args=(port, step_ms, tokens, plain_asgi), daemon=True)
    proc.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120)
        asyncio.run(_streams(port, 16, 5))  # warm-up: connections, imports, first-call caches
        worker = psutil.Process(proc.pid)
        cpu0, t0 = sum(worker.cpu_times()[:2]), time.perf_counter()
        n, gaps = asyncio.run(_streams(port, requests, tokens))
        wall, cpu = time.perf_counter() - t0, sum(worker.cpu_times()[:2]) - cpu0
    finally:
        proc.terminate()
        proc.join(10)
    if n != requests * tokens:
        raise RuntimeError(f"{n} tokens arrived of {requests * tokens}")
    return {"cpu_us_per_token": cpu / n * 1e6, "tokens_per_s": n / wall,
            "gap_p50_ms": float(np.percentile(gaps, 50)) * 1e3, "gap_p90_ms": float(np.percentile(gaps, 90)) * 1e3}


def main() -> None:
    a = stub_args(__doc__)
    old = measure(False, a.requests, a.step_ms, a.tokens)
    new = measure(True, a.requests, a.step_ms, a.tokens)
    common = {"requests": a.requests, "step_ms": a.step_ms, "tokens_per_request": a.tokens}
    base = "FastAPI route + StreamingResponse"
    emit("decode_http", "worker_cpu_us_per_token", new["cpu_us_per_token"], "us", base, old["cpu_us_per_token"],
         **common)
    emit("decode_http", "tokens_per_s", new["tokens_per_s"], "tok/s", base, old["tokens_per_s"], **common)
    emit("decode_http", "token_gap_p90_ms", new["gap_p90_ms"], "ms", base, old["gap_p90_ms"],
         gap_p50_ms=new["gap_p50_ms"], old_gap_p50_ms=old["gap_p50_ms"], **common)


if __name__ == "__main__":
    main()
