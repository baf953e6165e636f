"""The router's HTTP/1.1 server: the two OpenAI generation endpoints answered straight from the socket, every
other request through ASGI to the FastAPI app.

uvicorn with an ASGI app costs ~55 us of CPU a request on the CI machine before the app does anything
(a bare httptools protocol: ~40 us against uvicorn's ~95, a trivial app under each), and it writes a
response's headers and its body in two writes, so the client wakes twice. Under load the router is bound by
one core (the GIL), so that is throughput; when it is quiet it is latency. Here a generation request is
parsed with httptools (uvicorn's parser), handed to `RouterApp.answer` as (path, headers, body) in one task,
and answered in one write (a stream: headers with its first chunk, then a chunk a write). Anything else
(health, metrics, models, the admin API, the dashboard, the OpenAPI schema) goes to the FastAPI app through
a plain ASGI adapter.

HTTP/1.1 keep-alive (idle connections close after KEEP_ALIVE_S), pipelining (answered in order), chunked
request bodies, `Expect: 100-continue`, HEAD. A client that leaves cancels its request's task (the router
stops the worker streams and settles its usage); a stream whose reader lags pauses (TCP backpressure).
SIGINT or SIGTERM stops accepting, lets requests in flight finish for up to GRACEFUL_S, then stops.
`serve(..., processes=N)` runs N such processes on one listening socket.
"""

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httptools
import msgspec

log = logging.getLogger("pdserve.router")

_EAGER = sys.version_info >= (3, 12)  # asyncio.Task(eager_start=): a request's task starts within data_received
KEEP_ALIVE_S = 5.0  # an idle client connection is closed after this long (as uvicorn's default)
GRACEFUL_S = 30.0  # on SIGTERM, requests in flight get this long to finish
MAX_HEADER_BYTES = 64 << 10
_REASONS = {200: b"OK", 100: b"Continue", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
            404: b"Not Found", 413: b"Content Too Large", 429: b"Too Many Requests", 431:
            b"Request Header Fields Too Large", 500: b"Internal Server Error", 502: b"Bad Gateway",
            503: b"Service Unavailable", 504: b"Gateway Timeout"}


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))


@dataclass(slots=True)
class Answer:
    """What a native endpoint answers: a whole body, or a stream of chunks (sent chunked as they come)."""

    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None
    on_close: Callable[[], Any] | None = None  # awaited once the answer is over, however it ended


@dataclass(slots=True)
class Request:
    method: str = ""
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    header_bytes: int = 0
    body: list[bytes] = field(default_factory=list)
    body_size: int = 0
    keep_alive: bool = True
    version: str = "1.1"

    def header(self, name: bytes) -> str | None:
        return header(self.headers, name)


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The value of the (lower-case) header `name` in ASGI-style (name, value) pairs, or None."""
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


class HttpServer:
    """`app` is a RouterApp: `native` (path -> handler(request, body) -> Answer), `api` (the ASGI app for the
    rest), `state.start()` / `state.stop()`, and `too_large(max_bytes)`, the OpenAI-shaped refusal of a big
    body."""

    def __init__(self, app: Any, max_body_bytes: int, keep_alive_s: float = KEEP_ALIVE_S):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.keep_alive_s = keep_alive_s
        self.connections: set[_Connection] = set()
        self.closing = False

    def protocol(self) -> "_Connection":
        return _Connection(self)

    async def serve(self, sock: socket.socket, graceful_s: float = GRACEFUL_S) -> None:
        """Start the app, serve on `sock` until SIGINT or SIGTERM, then stop gracefully."""
        loop = asyncio.get_running_loop()
        await self.app.state.start()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = await loop.create_server(self.protocol, sock=sock, backlog=2048)
        try:
            await stop.wait()
        finally:
            server.close()
            self.closing = True
            for conn in list(self.connections):
                conn.shutdown()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(graceful_s):
                    while self.connections:
                        await asyncio.sleep(0.05)
            for conn in list(self.connections):
                conn.abort()
            await self.app.state.stop()


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer):
        self.server = server
        self.app = server.app
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.req: Request | None = None  # being received
        self.waiting: deque[Request] = deque()  # received, behind the one being answered (pipelining)
        self.task: asyncio.Task | None = None  # answering
        self.keep_alive_timer: asyncio.TimerHandle | None = None
        self.write_paused: asyncio.Future | None = None
        self.closed: asyncio.Future = self.loop.create_future()  # done when the client is gone
        self.peer: tuple | None = None  # the client's address and ours (ASGI's scope), when first asked
        self.local: tuple | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        self._arm_keep_alive()

    def data_received(self, data: bytes) -> None:
        if self.keep_alive_timer is not None:
            self.keep_alive_timer.cancel()
            self.keep_alive_timer = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, b"protocol upgrades are not supported")
        except httptools.HttpParserError as e:
            if not isinstance(e.__context__, _Refused):  # else a callback answered already
                self._refuse(400, b"invalid HTTP request")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        if self.keep_alive_timer is not None:
            self.keep_alive_timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left: whatever answers it stops and frees what it holds
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)

    def pause_writing(self) -> None:
        if self.write_paused is None or self.write_paused.done():
            self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        self.req = Request()

    def on_url(self, url: bytes) -> None:
        self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        req.header_bytes += len(name) + len(value)
        if req.header_bytes > MAX_HEADER_BYTES:
            self._refuse(431, b"the request's headers are too large")
            raise _Refused
        req.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        req, p = self.req, self.parser
        req.method = p.get_method().decode("ascii", "replace")
        req.version = p.get_http_version()
        req.keep_alive = p.should_keep_alive()
        length = req.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body_bytes:
            self._refuse_too_large()
            raise _Refused
        if (req.header(b"expect") or "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        req = self.req
        req.body_size += len(body)
        if req.body_size > self.server.max_body_bytes:  # a chunked body without a declared length
            self._refuse_too_large()
            raise _Refused
        req.body.append(body)

    def on_message_complete(self) -> None:
        req, self.req = self.req, None
        if self.task is None:
            self._start(req, eager=_EAGER)
        else:
            self.waiting.append(req)
            if self.transport is not None:
                self.transport.pause_reading()  # one request ahead is enough

    # --- answering ---

    def _start(self, req: Request, eager: bool = False) -> None:
        """Answer `req` in a task. eager (Python 3.12+): the task runs at once, up to its first wait (for a
        generation: until its request is written to the worker), not on the loop's next turn. A request
        answered without waiting (an error) is over before this returns: no task is left to hold."""
        if eager:
            task = asyncio.Task(self._answer(req), loop=self.loop, eager_start=True)
            if task.done():
                return
        else:
            task = self.loop.create_task(self._answer(req))
        self.task = task

    async def _answer(self, req: Request) -> None:
        body = req.body[0] if len(req.body) == 1 else b"".join(req.body)
        path, _, _ = req.url.partition(b"?")
        handler = self.app.native.get(path) if req.method == "POST" else None
        try:
            if handler is not None:
                answer = await handler(req, body)
                await self._send_answer(req, answer)
            else:
                await self._asgi(req, body)
        except asyncio.CancelledError:
            if self.transport is not None:  # cancelled by shutdown, not by the client leaving
                self.transport.close()
            return
        except Exception as e:  # noqa: BLE001 - a bug must not leave the client waiting
            log.error("unexpected error answering %s %r", req.method, req.url, exc_info=e)
            if self.transport is not None:
                self.transport.close()
            return
        finally:
            self.task = None
        self._next(req)

    def _next(self, done: Request) -> None:
        if self.transport is None:
            return
        if not done.keep_alive or self.server.closing:
            self.transport.close()
        elif self.waiting:
            self._start(self.waiting.popleft())
            if not self.waiting:
                self.transport.resume_reading()
        else:
            self._arm_keep_alive()

    def _arm_keep_alive(self) -> None:
        if self.transport is not None:
            self.keep_alive_timer = self.loop.call_later(self.server.keep_alive_s, self._idle)

    def _idle(self) -> None:
        if self.task is None and self.transport is not None:
            self.transport.close()

    def _head(self, req: Request, status: int, headers: list[tuple[bytes, bytes]]) -> list[bytes]:
        out = [status_line(status)]
        for k, v in headers:
            out += (k, b": ", v, b"\r\n")
        if not req.keep_alive or self.server.closing:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        return out

    async def _send_answer(self, req: Request, answer: Answer) -> None:
        try:
            if answer.stream is None:
                self._write_whole(req, answer.status, answer.headers, answer.body)
                return
            stream = answer.stream
            try:
                first = await anext(stream, None)
                head = self._head(req, answer.status, [*answer.headers, (b"transfer-encoding", b"chunked")])
                if first is None:
                    self._write(b"".join([*head, b"0\r\n\r\n"]))
                    return
                self._write(b"".join([*head, b"%x\r\n" % len(first), first, b"\r\n"]))
                async for data in stream:
                    await self._write_body(data)
                self._write(b"0\r\n\r\n")
            finally:
                await stream.aclose()  # the client may have left: the stream's cleanup runs now
        finally:
            if answer.on_close is not None:
                await answer.on_close()

    def _write_whole(self, req: Request, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        head = self._head(req, status, [*headers, (b"content-length", b"%d" % len(body))])
        self._write(b"".join([*head, body]) if req.method != "HEAD" else b"".join(head))

    def _write(self, data: bytes) -> None:
        if self.transport is None:
            raise asyncio.CancelledError  # the client is gone (connection_lost cancels the task too)
        self.transport.write(data)

    async def _write_body(self, data: bytes, chunked: bool = True) -> None:
        """A part of a body (a chunk of a chunked one), once the client has read what was written before
        (backpressure: the transport paused writing)."""
        if self.write_paused is not None and not self.write_paused.done():
            await self.write_paused
        self._write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

    def _refuse(self, status: int, message: bytes, content_type: bytes = b"text/plain") -> None:
        """Answer a request that cannot be served, and close (the rest of it is not read). Nothing is written
        while an earlier request on the connection is being answered (it would land inside that answer)."""
        if self.transport is None:
            return
        if self.task is None:
            self.transport.write(b"".join([status_line(status), b"content-type: %s\r\ncontent-length: %d\r\n"
                                           b"connection: close\r\n\r\n" % (content_type, len(message)), message]))
        self.transport.close()

    def _refuse_too_large(self) -> None:
        error = self.app.too_large(self.server.max_body_bytes)
        self._refuse(error.status, msgspec.json.encode(error.body()), b"application/json")

    # --- everything else: ASGI ---

    async def _asgi(self, req: Request, body: bytes) -> None:
        raw_path, _, query = req.url.partition(b"?")
        path = raw_path.decode("latin-1")
        if self.peer is None and self.transport is not None:
            self.peer = (self.transport.get_extra_info("peername") or ("", 0))[:2]
            self.local = (self.transport.get_extra_info("sockname") or ("", 0))[:2]
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": req.version,
                 "method": req.method, "scheme": "http", "path": unquote(path) if "%" in path else path,
                 "raw_path": raw_path, "query_string": query, "root_path": "", "headers": req.headers,
                 "client": self.peer, "server": self.local, "state": {}}
        sent_body = False
        response: dict[str, Any] = {}  # status and headers, written with the first body part
        ended = self.loop.create_future()  # the response is complete

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            # Nothing more comes: "disconnect" once the client leaves or the response is complete.
            await asyncio.wait([ended, self.closed], return_when=asyncio.FIRST_COMPLETED)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                response["status"], response["headers"] = message["status"], list(message.get("headers", []))
                return
            if kind != "http.response.body" or "status" not in response or response.get("done"):
                raise RuntimeError(f"unexpected ASGI message {kind!r}")
            data, more = message.get("body", b""), message.get("more_body", False)
            if "chunked" not in response:  # the first body part: headers go out with it
                headers = response["headers"]
                declared = any(k.lower() == b"content-length" for k, _ in headers)
                if not declared and not more:
                    self._write_whole(req, response["status"], headers, data)
                    response["done"] = True
                    ended.set_result(None)
                    return
                response["chunked"] = not declared and req.method != "HEAD"
                if response["chunked"]:
                    headers = [*headers, (b"transfer-encoding", b"chunked")]
                self._write(b"".join(self._head(req, response["status"], headers)))
            if req.method != "HEAD" and data:
                await self._write_body(data, response["chunked"])
            if not more:
                if response["chunked"]:
                    self._write(b"0\r\n\r\n")
                response["done"] = True
                ended.set_result(None)

        try:
            await self.app.api(scope, receive, send)
        except Exception:
            if "status" not in response:  # nothing written yet: a plain 500
                self._write_whole(req, 500, [(b"content-type", b"text/plain")], b"internal server error")
                return
            raise
        if not response.get("done"):
            if "status" not in response:
                self._write_whole(req, 500, [(b"content-type", b"text/plain")], b"no response")
            else:
                raise RuntimeError("the ASGI app did not finish its response")

    # --- shutdown ---

    def shutdown(self) -> None:
        """The server is stopping: close when idle, else after the answer in progress."""
        if self.task is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()


class _Refused(Exception):
    """Raised in a parser callback once the request is refused (answered and closed): stops the parser."""


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(make_app: Callable[[], Any], host: str, port: int, processes: int = 1) -> None:
    """Serve make_app() on host:port until SIGINT/SIGTERM; with processes > 1, that many processes on one
    listening socket (the kernel spreads the connections), each making its own app. make_app must pickle
    (a module-level function or a functools.partial of one) when processes > 1."""
    sock = bind(host, port)
    if processes <= 1:
        _run(make_app, sock)
        return
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_run, args=(make_app, sock), daemon=False) for _ in range(processes)]
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for c in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signum)  # each stops gracefully

    for c in children:
        c.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    from multiprocessing.connection import wait

    while children:
        ended = wait([c.sentinel for c in children])
        for c in [c for c in children if c.sentinel in ended]:
            children.remove(c)
            if not stopping:  # a router process died: start another in its place
                log.error("router process %s exited with %s; starting another", c.pid, c.exitcode)
                new = ctx.Process(target=_run, args=(make_app, sock), daemon=False)
                new.start()
                children.append(new)


def _run(make_app: Callable[[], Any], sock: socket.socket) -> None:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        runner = asyncio.run

    async def main() -> None:
        app = make_app()
        await HttpServer(app, app.state.config.max_body_bytes).serve(sock)

    runner(main())
