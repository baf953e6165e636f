"""A minimal keep-alive HTTP/1.1 client on asyncio streams, cheap enough that routers, not the client, are
what a benchmark measures. It timestamps every body chunk (for streamed responses) and reads server-sent
events as they arrive (`post_sse`).

An httpx stream costs ~0.2 ms of client CPU a token: one load-generator process on this 2-core VM
saturated at ~5,500 streamed tokens/s, with the server idle, and its TTFTs grew to seconds.
"""

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Timed:
    status: int
    start: float
    end: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each non-empty body chunk
    body: bytes = b""


class RawConnection:
    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None):
        """headers: sent with every request (an API key's Authorization)."""
        self.host, self.port = host, port
        self.extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in (headers or {}).items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def _send(self, path: str, body: bytes) -> tuple[int, dict[str, str]]:
        """Write the request; the answer's status and headers (lower-case names)."""
        self.writer.write(b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n%s"
                          b"content-length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), self.extra, len(body),
                                                          body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        return int(lines[0].split(" ", 2)[1]), headers

    async def _chunk(self) -> bytes:
        """The next chunk of a chunked body; b"" after the last one (its terminator read too)."""
        size = int((await self.reader.readline()).split(b";")[0], 16)
        if size == 0:
            await self.reader.readline()
            return b""
        data = await self.reader.readexactly(size)
        await self.reader.readexactly(2)
        return data

    def _done(self, headers: dict[str, str]) -> None:
        if headers.get("connection", "").lower() == "close" and self.writer is not None:
            self.writer.close()
            self.writer = None

    async def post_json(self, path: str, payload: dict) -> Timed:
        if self.writer is None:
            await self._connect()
        body = json.dumps(payload).encode()
        start = time.perf_counter()
        status, headers = await self._send(path, body)
        t = Timed(status, start, start)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while data := await self._chunk():
                parts.append(data)
                t.chunk_times.append(time.perf_counter())
            t.body = b"".join(parts)
        else:
            t.body = await self.reader.readexactly(int(headers.get("content-length", 0)))
            t.chunk_times.append(time.perf_counter())
        t.end = time.perf_counter()
        self._done(headers)
        return t

    async def post_sse(self, path: str, payload: dict) -> AsyncIterator[tuple[int, bytes]]:
        """POST, then yield (status, data) for each server-sent event's `data:` payload as it arrives; a
        response that is not an event stream yields its whole body once. The connection is reusable after
        the last item (a caller that stops early must drop it: `self.writer = None`)."""
        if self.writer is None:
            await self._connect()
        status, headers = await self._send(path, json.dumps(payload).encode())
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        if "text/event-stream" not in headers.get("content-type", ""):
            if chunked:
                parts = []
                while data := await self._chunk():
                    parts.append(data)
                body = b"".join(parts)
            else:
                body = await self.reader.readexactly(int(headers.get("content-length", 0)))
            yield status, body
        else:
            pending = b""
            # Unframed (not chunked): the body runs until the server closes.
            while data := await (self._chunk() if chunked else self.reader.read(65536)):
                pending += data
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        if line.startswith(b"data:"):
                            yield status, line[5:].strip()
            if not chunked:
                self.writer.close()
                self.writer = None
        self._done(headers)


def host_port(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    if u.scheme != "http":
        raise ValueError(f"only http:// URLs are supported here, not {url!r}")
    return u.hostname or "127.0.0.1", u.port or 80


class ConnectionPool:
    """`size` keep-alive connections (made on first use): at most `size` requests in flight. The connection
    used last is used next (as an HTTP client's pool does), so a light load keeps reusing a few."""

    def __init__(self, host: str, port: int, size: int, headers: dict[str, str] | None = None):
        self.conns = [RawConnection(host, port, headers) for _ in range(size)]
        self.idle: asyncio.Queue[RawConnection] = asyncio.LifoQueue()
        for conn in self.conns:
            self.idle.put_nowait(conn)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[RawConnection]:
        conn = await self.idle.get()
        try:
            yield conn
        except BaseException:
            conn.writer = None  # broken, or left mid-answer: the next request reconnects
            raise
        finally:
            self.idle.put_nowait(conn)

    async def post_json(self, path: str, payload: dict) -> Timed:
        async with self.connection() as conn:
            return await conn.post_json(path, payload)

    def close(self) -> None:
        for conn in self.conns:
            if conn.writer is not None:
                conn.writer.close()
