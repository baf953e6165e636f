"""A cheap mock worker on raw asyncio, with known delays: the first token after `ttft_s`, then one every
`itl_s`. It speaks the OpenAI API (for load generators and peer routers) and pdserve's internal worker API
(/info, /tokenizer, /load, /kv_events, /channel/{id}, /generate, /abort/{id}), so routers can be measured
without a model.

  python -m bench.mock_server --port 9000 --ttft 0.1 --itl 0.02 [--tokenizer-dir DIR]
"""

import argparse
import asyncio
import json
import socket
import threading
import time
from collections import OrderedDict


class MockServer:
    def __init__(self, ttft_s: float = 0.1, itl_s: float = 0.02, model: str = "mock",
                 tokenizer_files: dict[str, str] | None = None, cache_blocks: int | None = None,
                 prefill_tokens_per_s: float = 0.0):
        self.ttft_s, self.itl_s, self.model = ttft_s, itl_s, model
        # With a prefill rate (and a cache), prompts are computed one after another at that many uncached tokens
        # a second before their first token: queued work delays a request the way it does on a real worker.
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.prefill_busy_until = 0.0
        self.prefill_waiting = 0
        self.tokenizer_files = tokenizer_files or {}
        self.requests = 0
        self.channels: dict[str, asyncio.StreamWriter] = {}  # a router's token channel, by its id
        self.streaming: dict[str, asyncio.Task] = {}  # requests whose tokens are being written to a channel
        self.heartbeats: set[asyncio.Task] = set()
        from protocol.block_hash import root_hash

        # With cache_blocks, the mock keeps an LRU prefix cache of block hashes like a real worker: it counts
        # its own hits and reports stored/removed KV events (routing-quality benchmarks).
        self.cache = None if cache_blocks is None else BlockCache(cache_blocks, root_hash(model), tokenizer_files)
        self.info = {"role": "decode", "name": "mock", "model": model, "block_size": 16,
                     "root_hash": root_hash(model), "max_model_len": 32768, "tokenizer_hash": "mock"}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                await self._respond(method, path, json.loads(body) if body else {}, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for channel_id in [c for c, w in self.channels.items() if w is writer]:
                del self.channels[channel_id]
            writer.close()

    def _json(self, writer: asyncio.StreamWriter, payload: object) -> None:
        data = json.dumps(payload).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(data), data))

    async def _respond(self, method: str, path: str, body: dict, writer: asyncio.StreamWriter) -> None:
        path, _, qs = path.partition("?")
        query = dict(p.split("=", 1) for p in qs.split("&") if "=" in p)
        if path.startswith("/channel/"):
            await self._channel(path[len("/channel/"):], writer)
            return
        if path.startswith("/abort/"):
            task = self.streaming.pop(path[len("/abort/"):], None)
            if task is not None:
                task.cancel()
            self._json(writer, {"ok": True})
            await writer.drain()
            return
        if path == "/kv_events" and self.cache is not None:
            self._json(writer, self.cache.events_since(int(query.get("since", 0))))
            await writer.drain()
            return
        static = {"/health": {"status": "ok"}, "/ready": {"status": "ok"}, "/info": self.info,
                  "/tokenizer": self.tokenizer_files, "/kv_events": {"seq": 0, "resync": False, "events": []},
                  "/stats": self.cache.stats() if self.cache else {},
                  "/served": self.cache.served if self.cache else [],
                  "/v1/models": {"object": "list", "data": [{"id": self.model, "object": "model"}]},
                  "/load": {"running": 0, "waiting": self.prefill_waiting, "free_blocks": 1000, "total_blocks": 1000,
                            "tokens_computed": 0, "prompt_tokens_cached": 0}}
        if path in static:
            self._json(writer, static[path])
            await writer.drain()
            return
        self.requests += 1
        if self.cache is not None:
            uncached = self.cache.serve(body)
            if self.prefill_tokens_per_s:
                await self._prefill(uncached)
        if path == "/generate":
            await self._generate(body, writer)
            return
        chat = path.endswith("chat/completions")
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        prompt = body.get("prompt") or body.get("messages") or []
        prompt_tokens = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else 10
        if not body.get("stream"):
            await asyncio.sleep(self.ttft_s + self.itl_s * (n - 1))
            text = " x" * n
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": text, "finish_reason": "length"})
            self._json(writer, {"id": "mock", "object": "chat.completion" if chat else "text_completion",
                                "model": self.model, "choices": [choice],
                                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                          "total_tokens": prompt_tokens + n}})
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(self.ttft_s)
        for i in range(n):
            if i:
                await asyncio.sleep(self.itl_s)
            # " x" is one token for common BPE tokenizers, so clients that count tokens by re-tokenizing agree.
            choice = {"index": 0, "delta": {"content": " x"}} if chat else {"index": 0, "text": " x"}
            choice["finish_reason"] = "length" if i == n - 1 else None
            self._chunk(writer, {"object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]})
            await writer.drain()
        self._chunk(writer, {"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                      "total_tokens": prompt_tokens + n}})
        writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        await writer.drain()

    async def _prefill(self, tokens: int) -> None:
        """Wait for the prompts queued before this one, then for this one's `tokens` (FIFO, one at a time)."""
        now = time.monotonic()
        self.prefill_busy_until = max(now, self.prefill_busy_until) + tokens / self.prefill_tokens_per_s
        self.prefill_waiting += 1
        try:
            await asyncio.sleep(self.prefill_busy_until - now)
        finally:
            self.prefill_waiting -= 1

    async def _channel(self, channel_id: str, writer: asyncio.StreamWriter) -> None:
        """A router's token channel: frames (a JSON list of chunks a line) until the router leaves; an empty
        frame at once (the router's reader starts on the first bytes) and then every 5 s."""
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n")
        self.channels[channel_id] = writer

        async def beat() -> None:
            try:
                while not writer.is_closing():
                    writer.write(b"3\r\n[]\n\r\n")
                    await asyncio.sleep(5.0)
            finally:
                self.heartbeats.discard(asyncio.current_task())

        self.heartbeats.add(asyncio.get_running_loop().create_task(beat()))  # ends with the connection

    async def _generate(self, body: dict, writer: asyncio.StreamWriter) -> None:
        """pdserve's decode worker: taken at once, its tokens (one chunk a frame) on the router's channel; without
        a channel, on this response."""
        channel = self.channels.get(body.get("channel") or "")
        if body.get("channel") and channel is None:
            data = b'{"error": {"message": "no open channel", "code": "unknown_channel"}}'
            writer.write(b"HTTP/1.1 409 Conflict\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(data), data))
            await writer.drain()
            return
        if channel is not None:
            self._json(writer, {"ok": True})
            await writer.drain()
            rid = body["request_id"]
            task = self.streaming[rid] = asyncio.get_running_loop().create_task(self._tokens(body, channel))
            task.add_done_callback(lambda _: self.streaming.pop(rid, None))
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n")
        await self._tokens(body, writer)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _tokens(self, body: dict, writer: asyncio.StreamWriter) -> None:
        n = int(body["params"].get("max_tokens") or 16)
        rid, prompt_tokens = body["request_id"], len(body["prompt_token_ids"])
        await asyncio.sleep(self.ttft_s)
        for i in range(n):
            if i:
                await asyncio.sleep(self.itl_s)
            if writer.is_closing():  # the router left
                return
            line = json.dumps([{"request_id": rid, "token_ids": [1], "text": " x", "finished": i == n - 1,
                                "finish_reason": "length" if i == n - 1 else None, "logprobs": [],
                                "prompt_tokens": prompt_tokens, "cached_tokens": 0, "completion_tokens": i + 1,
                                "error": None}]).encode() + b"\n"
            writer.write(b"%x\r\n%s\r\n" % (len(line), line))
            await writer.drain()

    @staticmethod
    def _chunk(writer: asyncio.StreamWriter, obj: dict) -> None:
        data = b"data: " + json.dumps(obj).encode() + b"\n\n"
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def serve(self, host: str, port: int) -> asyncio.AbstractServer:
        return await asyncio.start_server(self.handle, host, port)


def cache_prompt(lru: "OrderedDict[int, None]", hashes: list[int], capacity: int) -> list[int]:
    """Put a prompt's blocks in an LRU cache of `capacity` blocks; returns the blocks evicted. They become the
    most recent, its last block the least recent of them, so it is evicted first and what stays is a prefix:
    real engines free a sequence's blocks tail first (engine.block_pool, vLLM), and a radix cache (SGLang)
    evicts leaves. Evicting the first block first would strand the rest: held, but behind a block that is
    gone."""
    for h in reversed(hashes):
        lru[h] = None
        lru.move_to_end(h)
    return [lru.popitem(last=False)[0] for _ in range(len(lru) - capacity)]


class BlockCache:
    """An LRU cache of chained block hashes, fed by the prompts a mock worker serves."""

    def __init__(self, capacity: int, root: int, tokenizer_files: dict[str, str]):
        from protocol.tokenizer import ChatTokenizer

        self.capacity, self.root = capacity, root
        self.tokenizer = ChatTokenizer.from_files(tokenizer_files)
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.events: list[dict] = []
        self.prompt_tokens = self.hit_tokens = self.requests = 0
        self.served: list[tuple[int, int, list[int]]] = []  # (time_ns, blocks hit, block hashes) a request

    def serve(self, body: dict) -> int:
        """Count this prompt's hits and cache its blocks; returns how many of its tokens must be computed."""
        from protocol.block_hash import hash_blocks

        if "prompt_token_ids" in body:
            ids = body["prompt_token_ids"]
        elif "messages" in body:
            ids = self.tokenizer.encode_chat(body["messages"])
        else:
            ids = self.tokenizer.encode(body["prompt"]) if isinstance(body.get("prompt"), str) else body["prompt"]
        hashes = hash_blocks(ids, 16, self.root)
        hits = 0
        for h in hashes:
            if h not in self.blocks:
                break
            hits += 1
        self.requests += 1
        self.prompt_tokens += len(ids)
        self.hit_tokens += hits * 16
        self.served.append((time.time_ns(), hits, hashes))
        new = [h for h in hashes[hits:] if h not in self.blocks]
        removed = cache_prompt(self.blocks, hashes, self.capacity)
        if new:
            self.events.append({"kind": "stored", "block_hashes": new, "parent_hash": None})
        if removed:
            self.events.append({"kind": "removed", "block_hashes": removed, "parent_hash": None})
        return len(ids) - hits * 16

    def events_since(self, seq: int) -> dict:
        out = [dict(seq=i + 1, **e) for i, e in enumerate(self.events) if i + 1 > seq]
        return {"seq": len(self.events), "resync": False, "events": out}

    def stats(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "hit_tokens": self.hit_tokens, "requests": self.requests}


def start_in_thread(ttft_s: float, itl_s: float, port: int = 0) -> tuple[MockServer, int]:
    """Run a mock server on its own loop in a daemon thread; returns it and its port."""
    mock = MockServer(ttft_s, itl_s)
    ready: list[int] = []
    started = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(mock.serve("127.0.0.1", port))
        ready.append(server.sockets[0].getsockname()[1])
        started.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    started.wait(10)
    return mock, ready[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--ttft", type=float, default=0.1)
    ap.add_argument("--itl", type=float, default=0.02)
    ap.add_argument("--model", default="mock")
    ap.add_argument("--tokenizer-dir", default=None, help="tokenizer files to serve on /tokenizer")
    ap.add_argument("--cache-blocks", type=int, default=None, help="keep an LRU prefix cache of this many blocks")
    ap.add_argument("--prefill-tokens-per-s", type=float, default=0.0,
                    help="with --cache-blocks: compute uncached prompt tokens at this rate, one prompt at a time")
    a = ap.parse_args()
    files = {}
    if a.tokenizer_dir:
        from pathlib import Path

        files = {f.name: f.read_text() for f in Path(a.tokenizer_dir).iterdir() if f.is_file()}

    async def run() -> None:
        mock = MockServer(a.ttft, a.itl, a.model, files, a.cache_blocks, a.prefill_tokens_per_s)
        server = await mock.serve("127.0.0.1", a.port)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
