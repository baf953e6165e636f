"""The engine on its own thread, driven from asyncio: streaming generate, abort, and calls between steps.

One thread owns the LLMEngine (nothing else touches it); commands reach it through a queue and run
between steps, outputs come back to each request's asyncio queue on the caller's loop.
"""

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger("pdserve.engine")
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread failed; every request in flight fails with this."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, after_step: Callable[[LLMEngine], None] | None = None):
        self.engine = engine
        self.after_step = after_step  # runs on the engine thread after each step (e.g. to drain KV events)
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    # --- called from asyncio ---

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 hold_kv: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iterator early (or being cancelled) aborts it."""
        return self.stream(request_id, _adder(request_id, prompt_token_ids, params, hold_kv))

    def generate_batches(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
                         ) -> AsyncIterator[list[RequestOutput]]:
        """generate, as lists of the outputs that arrived together (see stream_batches)."""
        return self.stream_batches(request_id, _adder(request_id, prompt_token_ids, params, False))

    async def stream(self, request_id: str, start: Callable[[LLMEngine], RequestOutput | None]
                     ) -> AsyncIterator[RequestOutput]:
        """Run start(engine) on the engine thread, then stream the request's outputs (start's first)."""
        async for batch in self.stream_batches(request_id, start):
            for out in batch:
                yield out

    async def stream_batches(self, request_id: str, start: Callable[[LLMEngine], RequestOutput | None]
                             ) -> AsyncIterator[list[RequestOutput]]:
        """The same, as lists: every output that arrived while the consumer was busy comes in one list (one
        write for a server that streams them; under load, fewer and larger writes)."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, outputs)
        finished = False
        try:
            first = await self.call(start)
            if first is not None:
                yield [first]
                if first.finished:
                    finished = True
                    return
            while True:
                batch = [await outputs.get()]
                while not outputs.empty():
                    batch.append(outputs.get_nowait())
                for i, item in enumerate(batch):
                    if isinstance(item, BaseException):
                        if i:
                            yield batch[:i]
                        raise item
                    if item.finished:
                        finished = True
                        yield batch[: i + 1]
                        return
                yield batch
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(lambda: self.engine.abort_request(request_id))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between steps and return its result."""
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")
        future: Future = Future()

        def run() -> None:
            # fn always runs (its side effects, e.g. freeing blocks, must happen even when the caller has been
            # cancelled meanwhile); its result goes to the caller only if the caller still waits for it.
            try:
                result = fn(self.engine)
            except Exception as e:  # handed to the caller
                with contextlib.suppress(InvalidStateError):
                    future.set_exception(e)
                return
            with contextlib.suppress(InvalidStateError):
                future.set_result(result)

        self._commands.put(run)
        return await asyncio.wrap_future(future)

    def fail(self, error: BaseException) -> None:
        """From any thread: the engine cannot go on (e.g. a rank of its group died). Every request in flight
        fails now, even while the engine thread is stuck in a collective; new ones are refused. The error
        replaces one the engine thread hit first (a collective failing because of this)."""
        self.error = error
        self._stop.set()
        self._commands.put(lambda: None)
        for rid in list(self._streams):
            self._deliver(rid, EngineDeadError(f"engine failed: {error}"))

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    # --- the engine thread ---

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._deliver_all(self.engine.step())
                    if self.after_step is not None:
                        self.after_step(self.engine)
        except BaseException as e:
            log.exception("engine thread failed")
            if self.error is None:  # fail() named the cause first (a dead rank); the collective's error is its echo
                self.error = e
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine failed: {e}"))

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            cmd()
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, one hand-off per event loop (not one a request: each wakes the loop through a
        pipe, and with hundreds of requests a step those writes and wake-ups cost more than the step's own
        host work)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _adder(request_id: str, prompt_token_ids: list[int], params: SamplingParams, hold_kv: bool
           ) -> Callable[[LLMEngine], None]:
    def start(engine: LLMEngine) -> None:
        engine.add_request(request_id, prompt_token_ids, params, hold_kv)

    return start
