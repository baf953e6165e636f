"""The router's HTTP/1.1 client to workers: POST a JSON body and read the answer as it streams (the data
plane), and GET a JSON answer (the health, load and KV-event polls).

Token streams between router and workers are most of the router's I/O, and a general client costs more per
request than the rest of routing (aiohttp: ~0.4 ms of CPU a request on the CI machine). This one is an
asyncio protocol around httptools' C parser with a keep-alive pool per host; TCP_NODELAY is set, so a
token is sent as soon as it is written. A response not read to its end (the client left) closes its
connection, which tells the worker to stop generating.

    async with client.post(url, body) as resp:
        if resp.status == 200:
            async for line in resp.lines(): ...
    load = await client.get_json(url, timeout_s=2.0)  # StatusError unless it answers 200

A poll through httpx cost ~0.9 ms of CPU on the CI machine (this: ~0.1 ms): with the polls of every worker
due at once each second, requests arriving meanwhile waited for them (the router's p99 latency).
"""

import asyncio
import functools
import socket
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httptools
import msgspec

_HIGH_WATER = 1 << 20  # pause reading a response whose consumer lags this many bytes behind


class StreamClientError(ConnectionError):
    """The worker could not be reached, or the connection broke before the answer was complete."""


class StatusError(StreamClientError):
    """The worker answered, with a status other than 200."""

    def __init__(self, url: str, status: int, body: bytes):
        super().__init__(f"{url} answered {status}: {body[:200].decode(errors='replace')}")
        self.status = status


def _expire(waiter: asyncio.Future, timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"the worker sent nothing for {timeout_s:g} s"))


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.lost: Exception | None = None
        self.waiter: asyncio.Future | None = None
        self.reset()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.lost = StreamClientError(f"bad HTTP from the worker: {e}")
            self.transport.close()
        # The reader is woken when it has something to act on: body bytes, the end, an error, or a status
        # other than 200. A 200's headers alone (a stream's first segment, before its first token) do not
        # wake it: the first token does, one task switch and one wait less on the way to the client.
        if self.chunks or self.complete or self.lost is not None or (self.headers_done and self.status != 200):
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete and self.lost is None:
            self.lost = StreamClientError(f"the worker closed the connection{f': {exc}' if exc else ''}")
        self.transport = None
        self._wake()

    # httptools callbacks
    def on_status(self, _: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()  # only valid until the message completes

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until bytes arrive or the connection ends; TimeoutError after timeout_s without either. A timer
        handle on the waiter rather than asyncio.timeout: ~1 against ~6 us of overhead a wait on the CI machine."""
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout_s, _expire, waiter, timeout_s)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def reset(self) -> None:
        """Ready for the next response on this connection."""
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers_done = self.keep_alive = self.complete = self.got_bytes = False

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and self.lost is None


class Response:
    def __init__(self, conn: _Connection, timeout_s: float):
        self._conn = conn
        self._timeout_s = timeout_s
        self.status = conn.status

    def _take(self) -> bytes | None:
        """Body bytes already received, or None; reading resumes once the backlog is down to half."""
        c = self._conn
        if not c.chunks:
            return None
        data = c.chunks.popleft()
        c.buffered -= len(data)
        if c.paused and c.buffered < _HIGH_WATER // 2 and c.transport is not None:
            c.paused = False
            c.transport.resume_reading()
        return data

    async def _more(self) -> bool:
        """Wait for more body bytes; False once the body is complete."""
        c = self._conn
        if c.complete:
            return False
        if c.lost is not None:
            raise c.lost
        await c.wait(self._timeout_s)
        return True

    async def chunks(self):
        """Body bytes as they arrive."""
        while True:
            while (data := self._take()) is not None:
                yield data
            if not await self._more():
                return

    async def lines(self):
        """Non-empty lines of the body (NDJSON), as they arrive (read in place: no generator of chunks under
        it, one step less a token)."""
        rest = b""
        while True:
            while (data := self._take()) is not None:
                *whole, rest = (rest + data).split(b"\n")
                for line in whole:
                    if line.strip():
                        yield line
            if not await self._more():
                break
        if rest.strip():
            yield rest

    async def read(self) -> bytes:
        return b"".join([d async for d in self.chunks()])


@functools.lru_cache(maxsize=1024)  # a router posts to a few URLs (each worker's /generate, /prefill) again and again
def _split(url: str) -> tuple[tuple[str, int], str, str]:
    """((host, port), host:port as written, path?query) of an http URL."""
    parts = urlsplit(url)
    return (parts.hostname, parts.port or 80), parts.netloc, f"{parts.path or '/'}{'?' + parts.query if parts.query else ''}"


class _Request:
    def __init__(self, client: "StreamClient", url: str, body: bytes | None, timeout_s: float | None,
                 sent: Callable[[], None] | None = None):
        """body None: a GET. sent: called once the request is written (before its answer is awaited)."""
        self.client, self.body, self.sent = client, body or b"", sent
        self.key, netloc, target = _split(url)
        if body is None:
            head = f"GET {target} HTTP/1.1\r\nhost: {netloc}\r\n{client.extra_headers}\r\n"
        else:
            head = (f"POST {target} HTTP/1.1\r\nhost: {netloc}\r\ncontent-type: application/json\r\n"
                    f"{client.extra_headers}content-length: {len(body)}\r\n\r\n")
        self.head = head.encode()
        self.timeout_s = timeout_s or client.timeout_s
        self.conn: _Connection | None = None

    async def __aenter__(self) -> Response:
        for attempt in range(2):
            conn, reused = await self.client._acquire(self.key)
            try:
                conn.transport.write(self.head + self.body)
                if self.sent is not None:
                    sent, self.sent = self.sent, None
                    sent()
                while not conn.headers_done and conn.lost is None:
                    await conn.wait(self.timeout_s)  # for a 200, until its body starts (or it ends)
            except BaseException:  # timeout or cancelled: this connection's answer will never be read
                if conn.transport is not None:
                    conn.transport.close()
                raise
            if conn.headers_done:
                self.conn = conn
                return Response(conn, self.timeout_s)
            # A kept-alive connection the worker had closed: nothing was read, so sending again is safe.
            if not (reused and not conn.got_bytes and attempt == 0):
                raise conn.lost
        raise AssertionError("unreachable")

    async def __aexit__(self, *exc) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if conn.complete and conn.usable and conn.keep_alive and not conn.chunks:
            conn.reset()
            self.client._release(self.key, conn)
        elif conn.transport is not None:
            conn.transport.close()  # unread or broken: the worker sees the client leave


class StreamClient:
    def __init__(self, timeout_s: float = 600.0, connect_timeout_s: float = 5.0, max_idle_per_host: int = 256,
                 headers: dict[str, str] | None = None):
        for k, v in (headers or {}).items():
            if any(c in k + v for c in "\r\n"):
                raise ValueError("header names and values cannot hold line breaks")
        self.extra_headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    def post(self, url: str, body: bytes, timeout_s: float | None = None,
             sent: Callable[[], None] | None = None) -> _Request:
        """sent: called once the request is written (the caller's bookkeeping, off the path to the worker)."""
        return _Request(self, url, body, timeout_s, sent)

    def get(self, url: str, timeout_s: float | None = None) -> _Request:
        return _Request(self, url, None, timeout_s)

    async def get_json(self, url: str, timeout_s: float | None = None) -> Any:
        """GET url and decode its JSON answer; StatusError unless it is a 200, ValueError if not JSON."""
        async with self.get(url, timeout_s) as resp:
            body = await resp.read()
        if resp.status != 200:
            raise StatusError(url, resp.status, body)
        return msgspec.json.decode(body)

    async def _acquire(self, key: tuple[str, int]) -> tuple[_Connection, bool]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Connection(loop), *key)
        except TimeoutError:
            raise StreamClientError(f"connecting to {key[0]}:{key[1]} timed out") from None
        except OSError as e:
            raise StreamClientError(f"cannot connect to {key[0]}:{key[1]}: {e}") from None
        return conn, False

    def _release(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.max_idle_per_host:
            idle.append(conn)
        else:
            conn.transport.close()

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
