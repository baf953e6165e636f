"""Token channels: one long-lived stream from each decode worker to this router process, on which the worker
writes each engine step's chunks of this router's requests as one frame (a line holding their JSON list;
decode_worker/streams.py). A request registers an inbox under its id before it is sent; the channel's reader
hands each chunk to its inbox. One read and one parse a step, whatever the number of requests, where a stream
a request cost a write, a read and a wake-up a token a request on both sides.

A channel that breaks or goes silent (the worker sends an empty frame every few seconds when idle) ends each
of its requests with an `engine_failed` chunk; the next request opens a new one.
"""

import asyncio
import logging
import uuid
from collections import deque

from protocol.messages import ChunkView, decode_frame
from protocol.stream_client import StatusError, StreamClient, StreamClientError

log = logging.getLogger("pdserve.router")
SILENCE_TIMEOUT_S = 30.0  # a channel that brings nothing (not even its heartbeat) this long is dead


class Inbox:
    """One request's chunks, as the channel's reader hands them over."""

    __slots__ = ("chunks", "waiter")

    def __init__(self) -> None:
        self.chunks: deque[ChunkView] = deque()
        self.waiter: asyncio.Future | None = None

    def put(self, chunk: ChunkView) -> None:
        self.chunks.append(chunk)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self, timeout_s: float) -> ChunkView:
        """The next chunk; TimeoutError when none comes for timeout_s (a worker whose engine is stuck still
        sends its channel's heartbeats)."""
        while not self.chunks:
            loop = asyncio.get_running_loop()
            waiter = self.waiter = loop.create_future()
            timer = loop.call_later(timeout_s, _expire, waiter, timeout_s)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
        return self.chunks.popleft()


def _expire(waiter: asyncio.Future, timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"the decode worker sent nothing for this request for {timeout_s:g} s"))


class TokenChannel:
    def __init__(self, client: StreamClient, url: str, timeout_s: float):
        self.url = url
        self.id = uuid.uuid4().hex
        self.inboxes: dict[str, Inbox] = {}
        self.closed = False
        self.stale = False  # discarded: the worker no longer knows it
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future = loop.create_future()
        self.task = loop.create_task(self._read(client, timeout_s))

    def register(self, request_id: str) -> Inbox:
        if self.closed:  # it broke after get() handed it out: the request goes elsewhere or again
            raise StreamClientError(f"the token channel to {self.url} closed")
        inbox = self.inboxes[request_id] = Inbox()
        return inbox

    async def _read(self, client: StreamClient, timeout_s: float) -> None:
        error = f"the decode worker {self.url} closed its token channel"
        try:
            async with client.get(f"{self.url}/channel/{self.id}", timeout_s) as resp:
                if resp.status != 200:
                    raise StatusError(f"{self.url}/channel", resp.status, await resp.read())
                self.opened.set_result(None)
                inboxes = self.inboxes
                async for line in resp.lines():
                    for chunk in decode_frame(line):
                        inbox = inboxes.get(chunk.request_id)
                        if inbox is not None:  # else: a request this router has left
                            inbox.put(chunk)
        except (StreamClientError, TimeoutError, ValueError) as e:
            error = f"lost the decode worker {self.url}: {e!r}"
        except asyncio.CancelledError:
            error = (f"the decode worker {self.url} no longer knows this router's channel" if self.stale
                     else "the router is stopping")
            raise
        finally:
            self.closed = True
            if not self.opened.done():
                self.opened.set_exception(StreamClientError(error))
                self.opened.exception()  # retrieved: a request that came meanwhile has its own copy
            failed = ChunkView(finished=True, finish_reason="error",
                               error={"message": error, "type": "server_error", "code": "engine_failed"})
            for inbox in self.inboxes.values():
                inbox.put(failed)
            self.inboxes.clear()


class TokenChannels:
    """This router process's channel to each decode worker, opened on first use and again after a break."""

    def __init__(self, client: StreamClient, timeout_s: float = SILENCE_TIMEOUT_S):
        self.client, self.timeout_s = client, timeout_s
        self.channels: dict[str, TokenChannel] = {}

    async def get(self, url: str) -> TokenChannel:
        """The open channel to the worker at url; StreamClientError if it cannot be opened."""
        channel = self.channels.get(url)
        if channel is None or channel.closed:
            channel = self.channels[url] = TokenChannel(self.client, url, self.timeout_s)
        await asyncio.shield(channel.opened)
        return channel

    def drop(self, url: str) -> None:
        """The worker at url restarted: its channel's requests end now (engine_failed: the router moves their
        streams elsewhere) rather than when the old connection breaks or goes silent."""
        channel = self.channels.get(url)
        if channel is not None:
            self.discard(channel)

    def discard(self, channel: TokenChannel) -> None:
        """Stop reading a channel the worker no longer knows; the next get() opens a new one."""
        channel.stale = True
        channel.task.cancel()
        if self.channels.get(channel.url) is channel:
            del self.channels[channel.url]

    async def close(self) -> None:
        for channel in self.channels.values():
            channel.task.cancel()
        await asyncio.gather(*(c.task for c in self.channels.values()), return_exceptions=True)
        self.channels.clear()
