"""Plain-ASGI helpers for the endpoints that skip the web framework's per-request layers (a decode worker's
/generate; the router has its own server, router/server.py): their streams are most of those processes'
writes, and each middleware layer and response class costs on every chunk."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any


def server_options(log_level: str) -> dict:
    """uvicorn's options for pdserve's workers: no proxy-headers middleware (nothing reads the client's
    address) and no access log unless it would be shown (uvicorn builds each line before the logger drops
    it)."""
    return {"log_level": log_level, "proxy_headers": False, "access_log": log_level.lower() in ("debug", "info")}


async def until_disconnect(work: Awaitable, receive: Callable) -> Any:
    """Await `work` unless the client disconnects first, which cancels it (freeing what it holds); None then.
    (A done-callback cancels this task: cheaper than running `work` as a task of its own and waiting on both.)"""
    task = asyncio.current_task()
    left = False

    def on_disconnect(w: asyncio.Future) -> None:
        nonlocal left
        if not w.cancelled():
            left = True
            task.cancel()

    watch = asyncio.ensure_future(_disconnected(receive))
    watch.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise
        task.uncancel()
        return None
    finally:
        watch.remove_done_callback(on_disconnect)
        watch.cancel()


async def _disconnected(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def read_body(receive: Callable) -> bytes:
    """The whole request body. Raises CancelledError when the client leaves before sending all of it."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError  # the client left before sending its whole body
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def send_bytes(send: Callable, status: int, data: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """A whole response with a body (headers: besides the content length)."""
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def send_stream(send: Callable, stream: AsyncIterator[bytes], headers: list[tuple[bytes, bytes]]) -> None:
    """A 200 whose body is the stream's chunks, each written as it comes. Headers go out with the first chunk:
    one wake-up of the client, not one for headers in the middle of the work on the request and another for
    the chunk."""
    try:
        first = await anext(stream, None)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if first is not None:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for data in stream:
                await send({"type": "http.response.body", "body": data, "more_body": True})
    finally:
        await stream.aclose()  # the client may have left: the stream's cleanup runs now
    await send({"type": "http.response.body", "body": b""})
