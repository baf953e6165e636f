"""An async load generator for any OpenAI-compatible endpoint: arrivals, streaming, per-request timings.

Each request records time to first token, every gap between streamed chunks (one token a chunk), end-to-end
latency, token counts and cached prompt tokens from `usage`, and errors by status. Requests go through
bench.raw_http (a plain asyncio HTTP/1.1 client: the client must not be what is measured) and, for high rates,
from several processes (`procs`).
"""

import asyncio
import json
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bench.raw_http import ConnectionPool, host_port


@dataclass
class RequestResult:
    status: int = 0
    ttft_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    text: str = ""
    done_at: float = 0.0  # wall clock (time.time), to order the requests of several processes
    started: float = 0.0  # time.perf_counter() when it was sent

    def token_times(self) -> list[float]:
        """perf_counter() times each streamed chunk (a token) arrived."""
        if self.ttft_s is None:
            return []
        return (self.started + self.ttft_s + np.cumsum([0.0, *self.itls_s])).tolist()


def arrivals(n: int, rate: float | None, kind: str, seed: int) -> list[float]:
    """Start offsets (s) of n requests: poisson, constant, or all at once (rate None or burst)."""
    if rate is None or kind == "burst":
        return [0.0] * n
    if kind == "constant":
        return [i / rate for i in range(n)]
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def stream_one(conns: ConnectionPool, path: str, body: dict[str, Any], timeout_s: float,
                     r: RequestResult | None = None) -> RequestResult:
    """One streamed request (body's "stream" set by the caller), timed into r (a new one if None: pass one to
    keep what a request that is cancelled had got)."""
    r = r if r is not None else RequestResult()
    last = None
    try:
        async with conns.connection() as conn, asyncio.timeout(timeout_s):
            start = r.started = time.perf_counter()
            async for status, data in conn.post_sse(path, body):
                r.status = status
                if status != 200:
                    r.error = data.decode(errors="replace")[:200]
                    continue  # read to the end: the connection stays usable
                if data == b"[DONE]" or r.error is not None:
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = chunk["error"].get("message")
                    continue
                if chunk.get("usage"):
                    u = chunk["usage"]
                    r.prompt_tokens, r.output_tokens = u["prompt_tokens"], u["completion_tokens"]
                    r.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                if not chunk.get("choices"):
                    continue
                c = chunk["choices"][0]
                r.text += (c.get("delta") or {}).get("content") or c.get("text") or ""
                now = time.perf_counter()
                if last is None:
                    r.ttft_s = now - start
                else:
                    r.itls_s.append(now - last)
                last = now
            r.e2e_s = time.perf_counter() - start
    except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as e:
        r.error = repr(e)  # the pool drops the connection: the next request reconnects
    r.done_at = time.time()
    return r


def _body(model: str, session: dict[str, Any], turn: int, history: list[dict[str, str]]) -> tuple[dict, bool]:
    if session["kind"] == "completion":
        return {"model": model, "prompt": session["prompt"], "max_tokens": session["max_tokens"],
                "temperature": 0, "ignore_eos": True}, False
    t = session["turns"][turn]
    return {"model": model, "messages": [*history, {"role": "user", "content": t["user"]}],
            "max_tokens": t["max_tokens"], "temperature": 0}, True


async def run_workload(base_url: str, model: str, sessions: list[dict[str, Any]], rate: float | None,
                       kind: str = "poisson", concurrency: int = 256, seed: int = 0, warmup: int = 0,
                       duration_s: float | None = None, timeout_s: float = 300.0, procs: int = 1
                       ) -> tuple[list[RequestResult], float]:
    """Replay sessions: each starts at its arrival time; its turns go one after another, each with the
    model's real answers appended. Returns the measured requests (after `warmup`, in the order they ended)
    and the wall time. procs > 1 splits the sessions over that many processes (same arrival times), for
    rates one Python process cannot drive without becoming what is measured."""
    offsets = arrivals(len(sessions), rate, kind, seed)
    if duration_s is not None:  # sessions that arrive after the run are never started
        kept = [i for i, o in enumerate(offsets) if o <= duration_s]
        sessions, offsets = [sessions[i] for i in kept], [offsets[i] for i in kept]
    start_at = time.time() + (1.0 if procs > 1 else 0.0)  # the processes' common start (wall clock)
    args = (base_url, model, max(1, concurrency // max(1, procs)), duration_s, timeout_s, start_at)
    if procs <= 1:
        results, wall = await _replay(*args, sessions, offsets)
    else:
        loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(procs, mp_context=ctx) as pool:
            parts = await asyncio.gather(*(loop.run_in_executor(
                pool, _replay_in_process, *args, sessions[p::procs], offsets[p::procs]) for p in range(procs)))
        results = [r for part, _ in parts for r in part]
        wall = max(w for _, w in parts)
    results.sort(key=lambda r: r.done_at)
    return results[warmup:], wall


def _replay_in_process(*args) -> tuple[list[RequestResult], float]:
    return asyncio.run(_replay(*args))


async def _replay(base_url: str, model: str, concurrency: int, duration_s: float | None, timeout_s: float,
                  start_at: float, sessions: list[dict[str, Any]], offsets: list[float]
                  ) -> tuple[list[RequestResult], float]:
    host, port = host_port(base_url)
    prefix = urlsplit(base_url).path.rstrip("/")
    conns = ConnectionPool(host, port, concurrency)
    results: list[RequestResult] = []
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    deadline = None if duration_s is None else t0 + duration_s

    async def session_task(offset: float, session: dict[str, Any]) -> None:
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        history: list[dict[str, str]] = []
        if session.get("system"):
            history.append({"role": "system", "content": session["system"]})
        for turn in range(len(session.get("turns", [None]))):
            if deadline is not None and time.perf_counter() > deadline:
                return
            body, chat = _body(model, session, turn, history)
            r = await stream_one(conns, f"{prefix}/v1/{'chat/completions' if chat else 'completions'}",
                           {**body, "stream": True, "stream_options": {"include_usage": True}}, timeout_s)
            results.append(r)
            if r.error is not None or not chat:
                return
            history += [body["messages"][-1], {"role": "assistant", "content": r.text}]

    await asyncio.gather(*(session_task(o, s) for o, s in zip(offsets, sessions, strict=True)))
    wall = time.perf_counter() - t0
    conns.close()
    return results, wall


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(results: list[RequestResult], wall_s: float, ttft_slo_s: float | None = None,
              tpot_slo_s: float | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.ttft_s is not None]
    ttft = [r.ttft_s for r in ok]
    itl = [g for r in ok for g in r.itls_s]
    e2e = [r.e2e_s for r in ok]
    by_status: dict[str, int] = {}
    for r in results:
        if r.error is not None or r.ttft_s is None:
            key = str(r.status or "connection")
            by_status[key] = by_status.get(key, 0) + 1
    out: dict[str, Any] = {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
                           "errors_by_status": by_status,
                           "wall_s": wall_s, "req_per_s": len(ok) / wall_s,
                           "output_tok_per_s": sum(r.output_tokens for r in ok) / wall_s}
    for name, vals in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = None if not vals else _pct(vals, q) * 1e3
    prompt = sum(r.prompt_tokens for r in ok)
    out["cache_hit_ratio"] = sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0
    if ttft_slo_s is not None and tpot_slo_s is not None:
        def meets(r: RequestResult) -> bool:
            tpot = (r.e2e_s - r.ttft_s) / max(1, r.output_tokens - 1)
            return r.ttft_s <= ttft_slo_s and tpot <= tpot_slo_s

        good = [r for r in ok if meets(r)]
        out["goodput_req_per_s"] = len(good) / wall_s
        out["slo_attainment"] = len(good) / len(results) if results else 0.0
    out["per_request"] = {"ttft_s": ttft, "e2e_s": e2e,
                          "tpot_s": [(r.e2e_s - r.ttft_s) / max(1, r.output_tokens - 1) for r in ok]}
    return out
