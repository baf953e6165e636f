"""The router's data-plane client against a real asyncio HTTP server that records what it sees."""

import asyncio

import pytest

from protocol.stream_client import StatusError, StreamClient, StreamClientError


class Server:
    """Answers POST /lines with `n` NDJSON lines, one every `gap_s`, chunked; /close answers and closes."""

    def __init__(self):
        self.connections = 0
        self.disconnects = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET "):  # a poll: JSON of what it asked, or 404 for /missing
                    self.requests.append(head)
                    target = head.split(b" ")[1]
                    token = next((h.split(b":", 1)[1].strip() for h in head.split(b"\r\n")
                                  if h.lower().startswith(b"x-token:")), b"")
                    status, body = ((b"404 Not Found", b"no such thing") if target == b"/missing" else
                                    (b"200 OK", b'{"target": "%s", "token": "%s"}' % (target, token)))
                    writer.write(b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body))
                    continue
                length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
                             .split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(body)
                path = head.split(b" ")[1]
                if path == b"/packed":  # a decode worker's batch: lines packed in a chunk, a line split over two
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    for part in (b'{"i": 0}\n{"i": 1}\n{"i"', b': 2}\n{"i": 3}\n'):
                        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                        await writer.drain()
                        await asyncio.sleep(0.01)
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    continue
                if path == b"/big":  # 4 MiB of 1 KiB lines as fast as the socket takes them
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    for i in range(4096):
                        line = b'{"i": %d, "pad": "%s"}\n' % (i, b"x" * 1000)
                        writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    continue
                if path in (b"/late", b"/late-error"):  # the headers at once, the body 0.2 s later
                    status = b"200 OK" if path == b"/late" else b"503 Service Unavailable"
                    writer.write(b"HTTP/1.1 %s\r\ntransfer-encoding: chunked\r\n\r\n" % status)
                    await writer.drain()
                    await asyncio.sleep(0.2)
                    writer.write(b"9\r\n{\"i\": 0}\n\r\n0\r\n\r\n")
                    await writer.drain()
                    continue
                if path == b"/close":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                    await writer.drain()
                    break
                n, gap = (int(x) for x in body.decode().split(","))
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(n):
                    line = b'{"i": %d}\n' % i
                    writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                    await writer.drain()
                    await asyncio.sleep(gap / 1000)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.disconnects += 1
        finally:
            writer.close()


@pytest.fixture
async def server():
    s = Server()
    srv = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    s.url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    yield s
    srv.close()


async def test_lines_stream_as_they_arrive_and_connections_are_reused(server):
    client = StreamClient(timeout_s=5)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        async with client.post(f"{server.url}/lines", b"3,100") as resp:
            assert resp.status == 200
            arrivals, lines = [], []
            async for line in resp.lines():
                arrivals.append(loop.time())
                lines.append(line)
        assert lines == [b'{"i": 0}', b'{"i": 1}', b'{"i": 2}']
        assert arrivals[1] - arrivals[0] > 0.05  # streamed, not buffered to the end
    assert server.connections == 1
    await client.close()


async def test_lines_packed_in_one_chunk_or_split_over_two_come_out_whole(server):
    client = StreamClient(timeout_s=5)
    async with client.post(f"{server.url}/packed", b"{}") as resp:
        lines = [line async for line in resp.lines()]
    assert lines == [b'{"i": 0}', b'{"i": 1}', b'{"i": 2}', b'{"i": 3}']
    await client.close()


async def test_leaving_a_response_unread_closes_its_connection(server):
    client = StreamClient(timeout_s=5)
    async with client.post(f"{server.url}/lines", b"50,20") as resp:
        async for _ in resp.lines():
            break  # the router's client left
    for _ in range(100):
        if server.disconnects:
            break
        await asyncio.sleep(0.02)
    assert server.disconnects == 1  # the worker learns the request is gone
    async with client.post(f"{server.url}/lines", b"1,0") as resp:
        assert await resp.read() == b'{"i": 0}\n'
    assert server.connections == 2
    await client.close()


async def test_connection_closed_by_the_server_is_not_reused(server):
    client = StreamClient(timeout_s=5)
    async with client.post(f"{server.url}/close", b"x") as resp:
        assert await resp.read() == b"ok"
    async with client.post(f"{server.url}/lines", b"1,0") as resp:
        assert await resp.read() == b'{"i": 0}\n'
    assert server.connections == 2
    await client.close()


async def test_unreachable_worker_and_silent_worker_give_clean_errors(server):
    client = StreamClient(timeout_s=0.2, connect_timeout_s=1)
    with pytest.raises(StreamClientError):
        async with client.post("http://127.0.0.1:1/generate", b"{}"):
            pass
    with pytest.raises(TimeoutError, match="sent nothing for 0.2 s"):
        async with client.post(f"{server.url}/lines", b"2,1000") as resp:
            await resp.read()
    # The limit is on silence, not on the whole answer: 6 lines 0.1 s apart take longer than 0.2 s.
    async with client.post(f"{server.url}/lines", b"6,100") as resp:
        assert len([line async for line in resp.lines()]) == 6
    await client.close()


async def test_get_json_sends_the_headers_decodes_the_answer_and_raises_on_other_statuses(server):
    client = StreamClient(timeout_s=5, headers={"x-token": "secret"})
    assert await client.get_json(f"{server.url}/kv_events?since=7") == {"target": "/kv_events?since=7",
                                                                         "token": "secret"}
    with pytest.raises(StatusError) as e:
        await client.get_json(f"{server.url}/missing")
    assert e.value.status == 404
    async with client.post(f"{server.url}/lines", b"1,0") as resp:  # polls and streams share connections
        assert await resp.read() == b'{"i": 0}\n'
    assert server.connections == 1
    await client.close()


async def test_sent_is_called_once_when_the_request_is_written_and_not_when_it_cannot_be(server):
    client = StreamClient(timeout_s=5, connect_timeout_s=1)
    calls = []
    async with client.post(f"{server.url}/lines", b"2,50", sent=lambda: calls.append(len(server.requests))) as resp:
        assert calls == [0]  # written, and called before the worker had even read it
        await resp.read()
    with pytest.raises(StreamClientError):
        async with client.post("http://127.0.0.1:1/generate", b"{}", sent=lambda: calls.append("unreachable")):
            pass
    assert calls == [0]
    await client.close()


async def test_a_lagging_reader_pauses_the_connection_and_gets_every_line_after():
    s = Server()
    srv = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/big"
    client = StreamClient(timeout_s=10)
    seen, paused = [], False
    async with client.post(url, b"{}") as resp:
        async for line in resp.lines():
            seen.append(line)
            if len(seen) == 1:
                await asyncio.sleep(0.5)  # the worker keeps writing meanwhile: over 1 MiB piles up
                paused = resp._conn.paused
    assert paused and not resp._conn.paused  # reading stopped while the reader lagged, and went on after
    assert len(seen) == 4096 and all(line.startswith(b'{"i": %d,' % i) for i, line in enumerate(seen))
    await client.close()
    srv.close()


async def test_a_200s_headers_alone_do_not_resume_the_reader_but_its_first_bytes_and_an_error_status_do(server):
    client = StreamClient(timeout_s=5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with client.post(f"{server.url}/late", b"{}") as resp:
        entered = loop.time()
        assert resp.status == 200 and entered - start >= 0.15  # resumed by the body, not by the headers
        assert [line async for line in resp.lines()] == [b'{"i": 0}']
    start = loop.time()
    async with client.post(f"{server.url}/late-error", b"{}") as resp:
        assert resp.status == 503 and loop.time() - start < 0.15  # an error status wakes it at once
        assert await resp.read() == b'{"i": 0}\n'
    await client.close()
