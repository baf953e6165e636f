"""The router's HTTP server (router/server.py) on a real socket, with a stub app: native endpoints and the
ASGI fallback, keep-alive and pipelining, request bodies (chunked, Expect: 100-continue, too large), bad
requests, a client that leaves, and a graceful stop."""

import asyncio
import json
import os
import signal

import pytest

from router.errors import OpenAIError
from router.server import Answer, HttpServer, bind


class StubState:
    def __init__(self):
        self.started = self.stopped = False

    async def start(self):
        self.started = True

    async def stop(self):
        self.stopped = True


class StubApp:
    """/echo answers the body it got; /stream streams n chunks; /slow waits until cancelled; the rest goes
    to a small ASGI app (streamed when the path is /asgi-stream)."""

    def __init__(self):
        self.state = StubState()
        self.cancelled = asyncio.Event()
        self.closed_answers = 0
        self.native = {b"/echo": self.echo, b"/stream": self.stream, b"/slow": self.slow}

    @staticmethod
    def too_large(max_bytes: int) -> OpenAIError:
        return OpenAIError(400, f"the request body is over {max_bytes} bytes", code="request_too_large")

    async def echo(self, req, body: bytes) -> Answer:
        return Answer(200, json.dumps({"body": body.decode(), "auth": req.header(b"authorization")}).encode(),
                      [(b"content-type", b"application/json")])

    async def stream(self, req, body: bytes) -> Answer:
        async def chunks():
            for i in range(int(body or b"3")):
                yield b"data: %d\n\n" % i
                await asyncio.sleep(0.01)

        async def close():
            self.closed_answers += 1

        return Answer(200, headers=[(b"content-type", b"text/event-stream")], stream=chunks(), on_close=close)

    async def slow(self, req, body: bytes) -> Answer:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Answer(200, b"late")

    async def api(self, scope, receive, send):
        message = await receive()
        body = f"{scope['method']} {scope['path']} {scope['query_string'].decode()} {message['body'].decode()}"
        if scope["path"] == "/asgi-stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for part in (b"one ", b"two"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 404 if scope["path"] == "/missing" else 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})


@pytest.fixture
async def server():
    app = StubApp()
    sock = bind("127.0.0.1", 0)
    http = HttpServer(app, max_body_bytes=1000, keep_alive_s=0.5)
    task = asyncio.create_task(http.serve(sock, graceful_s=2.0))
    port = sock.getsockname()[1]
    for _ in range(100):
        if app.state.started:
            break
        await asyncio.sleep(0.01)
    yield app, http, port, task
    if not task.done():
        task.cancel()


async def _open(port: int):
    return await asyncio.open_connection("127.0.0.1", port)


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
    else:
        body = await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers, body


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\n{extra}content-length: {len(body)}\r\n\r\n").encode() + body


async def test_native_and_asgi_requests_share_a_kept_alive_connection_and_pipelined_ones_answer_in_order(server):
    app, _, port, _ = server
    reader, writer = await _open(port)
    writer.write(_post("/echo", b"hello", "authorization: Bearer k\r\n"))
    status, headers, body = await _response(reader)
    assert status == 200 and json.loads(body) == {"body": "hello", "auth": "Bearer k"}
    assert headers["content-length"] == str(len(body)) and "connection" not in headers
    # Three requests in one write: a native one, an ASGI one, a native stream; answered in that order.
    writer.write(_post("/echo", b"a") + b"GET /models?x=1 HTTP/1.1\r\nhost: x\r\n\r\n" + _post("/stream", b"2"))
    assert json.loads((await _response(reader))[2])["body"] == "a"
    assert (await _response(reader))[2] == b"GET /models x=1 "
    status, headers, body = await _response(reader)
    assert headers["content-type"] == "text/event-stream" and body == b"data: 0\n\ndata: 1\n\n"
    assert app.closed_answers == 1
    writer.write(b"GET /asgi-stream HTTP/1.1\r\nhost: x\r\n\r\n")  # no length: the server chunks it
    status, headers, body = await _response(reader)
    assert headers["transfer-encoding"] == "chunked" and body == b"one two"
    writer.write(b"HEAD /missing HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404") and b"content-length: 15" in head
    writer.write(_post("/echo", b"after HEAD"))  # HEAD's body was not sent: the next answer is intact
    assert json.loads((await _response(reader))[2])["body"] == "after HEAD"
    writer.close()


async def test_chunked_bodies_expect_continue_and_too_large_bodies(server):
    _, _, port, _ = server
    reader, writer = await _open(port)
    writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert json.loads((await _response(reader))[2])["body"] == "abcde"
    writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n")
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"body")
    assert json.loads((await _response(reader))[2])["body"] == "body"
    writer.write(_post("/echo", b"x" * 1001))  # declared over the limit: refused before it is read
    status, headers, body = await _response(reader)
    assert status == 400 and json.loads(body)["error"]["code"] == "request_too_large"
    assert headers["connection"] == "close" and await reader.read() == b""
    reader, writer = await _open(port)  # chunked past the limit: refused as it passes it
    writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                 + b"".join(b"100\r\n" + b"y" * 256 + b"\r\n" for _ in range(5)))
    status, _, body = await _response(reader)
    assert status == 400 and json.loads(body)["error"]["code"] == "request_too_large"
    writer.close()


async def test_malformed_requests_get_400_and_a_closed_connection(server):
    _, _, port, _ = server
    for raw in (b"NOT HTTP AT ALL\r\n\r\n", b"POST /echo HTTP/1.1\r\ncontent-length: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nhost: x\r\n" + b"x-big: " + b"z" * (70 << 10) + b"\r\n\r\n"):
        reader, writer = await _open(port)
        writer.write(raw)
        data = await reader.read()
        assert data.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), data[:40]
        writer.close()


async def test_a_client_that_leaves_cancels_its_request_and_idle_connections_close(server):
    app, _, port, _ = server
    reader, writer = await _open(port)
    writer.write(_post("/slow", b""))
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.wait_for(app.cancelled.wait(), 2)
    reader, writer = await _open(port)
    writer.write(_post("/echo", b"x"))
    await _response(reader)
    assert await asyncio.wait_for(reader.read(), 2) == b""  # closed after keep_alive_s idle
    writer.close()


async def test_stopping_lets_the_request_in_flight_finish_then_stops_the_app(server):
    app, http, port, task = server
    reader, writer = await _open(port)
    writer.write(_post("/stream", b"20"))  # ~0.2 s of chunks
    idle_reader, _ = await _open(port)
    await asyncio.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)  # what `kubectl delete pod` sends
    status, _, body = await _response(reader)
    assert status == 200 and body.count(b"data:") == 20  # finished, then closed
    assert await reader.read() == b"" and await idle_reader.read() == b""
    await asyncio.wait_for(task, 5)
    assert app.state.stopped
