"""A minimal keep-alive HTTP/1.1 client on asyncio streams, cheap enough that routers, not the client, are
what a benchmark measures. It timestamps every body chunk (for streamed responses) and reads server-sent
events as they arrive (`post_sse`).

An httpx stream costs ~0.2 ms of client CPU a token: one load-generator process on this 2-core VM
saturated at ~5,500 streamed tokens/s, with the server idle, and its TTFTs grew to seconds.
"""

import asyncio
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
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def post_json(self, path: str, payload: dict) -> Timed:
        if self.writer is None:
            await self._connect()
        body = json.dumps(payload).encode()
        start = time.perf_counter()
        self.writer.write(b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                          b"content-length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        t = Timed(status, start, start)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readline()
                    break
                parts.append(await self.reader.readexactly(size))
                t.chunk_times.append(time.perf_counter())
                await self.reader.readexactly(2)
            t.body = b"".join(parts)
        else:
            t.body = await self.reader.readexactly(int(headers.get("content-length", 0)))
            t.chunk_times.append(time.perf_counter())
        t.end = time.perf_counter()
        if headers.get("connection", "").lower() == "close":
            self.writer.close()
            self.writer = None
        return t

    async def _head(self, path: str, payload: dict) -> tuple[int, dict[str, str]]:
        if self.writer is None:
            await self._connect()
        body = json.dumps(payload).encode()
        self.writer.write(b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                          b"accept: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                          % (path.encode(), self.host.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        return int(lines[0].split(" ", 2)[1]), headers

    async def post_sse(self, path: str, payload: dict) -> AsyncIterator[tuple[int, bytes]]:
        """POST, then yield (status, data) for each server-sent event's `data:` payload as it arrives; a
        response that is not an event stream yields its whole body once. The connection is reusable after
        the last item (a caller that stops early must drop it: `self.writer = None`)."""
        status, headers = await self._head(path, payload)
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        if "text/event-stream" not in headers.get("content-type", ""):
            if chunked:
                parts = []
                while size := int((await self.reader.readline()).split(b";")[0], 16):
                    parts.append(await self.reader.readexactly(size))
                    await self.reader.readexactly(2)
                await self.reader.readline()
                body = b"".join(parts)
            else:
                body = await self.reader.readexactly(int(headers.get("content-length", 0)))
            yield status, body
        else:
            pending = b""
            while True:
                if chunked:
                    size = int((await self.reader.readline()).split(b";")[0], 16)
                    data = await self.reader.readexactly(size) if size else b""
                    await self.reader.readexactly(2)
                else:  # unframed: the body runs until the server closes
                    data = await self.reader.read(65536)
                    size = len(data)
                if not size:
                    break
                pending += data
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        if line.startswith(b"data:"):
                            yield status, line[5:].strip()
            if not chunked:
                self.writer.close()
                self.writer = None
        if headers.get("connection", "").lower() == "close" and self.writer is not None:
            self.writer.close()
            self.writer = None


def host_port(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    if u.scheme != "http":
        raise ValueError(f"only http:// URLs are supported here, not {url!r}")
    return u.hostname or "127.0.0.1", u.port or 80


class ConnectionPool:
    def __init__(self, host: str, port: int, size: int):
        self.idle: asyncio.Queue[RawConnection] = asyncio.Queue()
        for _ in range(size):
            self.idle.put_nowait(RawConnection(host, port))

    async def post_json(self, path: str, payload: dict) -> Timed:
        conn = await self.idle.get()
        try:
            return await conn.post_json(path, payload)
        except (ConnectionError, asyncio.IncompleteReadError):
            conn.writer = None  # reconnect next time
            raise
        finally:
            self.idle.put_nowait(conn)
