"""The frontend's handle on its engine core (worker/engine_core.py), on the frontend's event loop: requests in,
calls answered by futures, each Step handed to the role's handler in one callback (no task, queue or wake-up
a request). Torch-free.
"""

import asyncio
import itertools
import logging
import socket
from collections.abc import Callable
from typing import Any

from engine.errors import EngineDeadError, KVCacheFullError, RequestError
from engine.sampling_params import SamplingParams
from kv_transfer.descriptors import TransferError
from worker import ipc

log = logging.getLogger("pdserve.worker")
# A Reply's error, by the name the core sent, as the exception the caller catches.
_ERRORS: dict[str, type[Exception]] = {"RequestError": RequestError, "KVCacheFullError": KVCacheFullError,
                                       "TransferError": TransferError}


class EngineClient(asyncio.Protocol):
    def __init__(self, on_step: Callable[[ipc.Step], None], on_dead: Callable[[str], None],
                 on_drain: Callable[[], None]):
        """on_step: each Step, in order; on_dead: when the engine cannot go on (it failed; and when its process
        is gone, after that too); on_drain: the core's process asks the frontend to finish and exit."""
        self.on_step, self.on_dead, self.on_drain = on_step, on_dead, on_drain
        self.error: str | None = None
        self.transport: asyncio.Transport | None = None
        self._reader = ipc.FrameReader()
        self._calls: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self.hello: asyncio.Future[ipc.Hello] = asyncio.get_running_loop().create_future()

    @classmethod
    async def connect(cls, sock: socket.socket, on_step: Callable[[ipc.Step], None], on_dead: Callable[[str], None],
                      on_drain: Callable[[], None]) -> "EngineClient":
        """Over a connected socket to the core; returns once the core's Hello has arrived."""
        loop = asyncio.get_running_loop()
        _, client = await loop.create_unix_connection(lambda: cls(on_step, on_dead, on_drain), sock=sock)
        await client.hello
        return client

    # --- to the core ---

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, hold_kv: bool = False,
            resumed: list[int] | None = None) -> None:
        self._send(ipc.Add(request_id, prompt_token_ids, params, hold_kv, resumed or []))

    def abort(self, request_id: str) -> None:
        self._send(ipc.Abort(request_id))

    def start_remote(self, request_id: str, first_token: int, logprobs: list, prompt_logprobs: list | None = None
                     ) -> None:
        """logprobs, prompt_logprobs: (token, logprob, top) tuples, as in ipc.StartRemote."""
        self._send(ipc.StartRemote(request_id, first_token, logprobs, prompt_logprobs))

    def release(self, request_id: str) -> None:
        self._send(ipc.Release(request_id))

    def ready(self) -> None:
        self._send(ipc.Ready())

    async def reserve_remote(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                             resumed: list[int] | None = None) -> tuple[list[int], int]:
        """Blocks for a prompt (and resumed outputs) a prefill worker computes: (block ids, tokens already
        cached here). Raises RequestError, KVCacheFullError (no room now) or EngineDeadError."""
        block_ids, cached = await self._call(
            lambda i: ipc.ReserveRemote(i, request_id, prompt_token_ids, params, resumed or []))
        return block_ids, cached

    async def send_kv(self, request_id: str, dests: list[dict], dst_block_ids: list[int], skip_blocks: int,
                      timeout_s: float) -> int:
        """Write a held request's KV into a decode worker's pools; the bytes written. Raises TransferError,
        EngineDeadError."""
        return await self._call(lambda i: ipc.SendKV(i, request_id, dests, dst_block_ids, skip_blocks, timeout_s))

    async def adapter(self, name: str, path: str | None) -> dict[str, int]:
        """Serve a LoRA adapter folder as `name` (path None: unload it); every adapter served, name -> root.
        Raises RequestError (a bad adapter, an unknown name) or EngineDeadError."""
        return await self._call(lambda i: ipc.AdapterCall(i, name, path))

    async def _call(self, message: Callable[[int], ipc.Call]) -> Any:
        """Send the message made with a new call id; what its Reply holds, or the error the core raised."""
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")
        call_id = next(self._ids)
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        self._send(message(call_id))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _send(self, msg: ipc.ToCore) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ipc.frame(msg))

    # --- from the core (asyncio.Protocol) ---

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for body in self._reader.feed(data):
            msg = ipc.decode_to_frontend(body)
            if isinstance(msg, ipc.Step):
                self.on_step(msg)
            elif isinstance(msg, ipc.Reply):
                future = self._calls.get(msg.call_id)
                if future is not None and not future.done():
                    if msg.error is None:
                        future.set_result(msg.value)
                    else:
                        name, message = msg.error
                        future.set_exception(_ERRORS.get(name, RuntimeError)(message))
            elif isinstance(msg, ipc.Hello):
                self.hello.set_result(msg)
            elif isinstance(msg, ipc.Dead):
                self._die(msg.message)
            elif isinstance(msg, ipc.Drain):
                self.on_drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._die("the engine core's process is gone", again=True)
        if not self.hello.done():
            self.hello.set_exception(EngineDeadError("the engine core closed the connection before its Hello"))

    def _die(self, message: str, again: bool = False) -> None:
        """Once; again: also after a Dead (the core's process went after its engine failed)."""
        if self.error is not None and not again:
            return
        self.error = self.error or message
        log.error("engine failed: %s", message)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(f"engine failed: {message}"))
        self.on_dead(message)
