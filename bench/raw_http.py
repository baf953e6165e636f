"""A minimal keep-alive HTTP/1.1 client on asyncio streams, cheap enough that routers, not the client, are
what a benchmark measures. It timestamps every body chunk (for streamed responses)."""

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field


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
