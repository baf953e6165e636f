"""A worker's engine core: the loop that schedules and launches steps, in rank 0's process, where nothing
per-token takes its GIL (HTTP, detokenizing, stop strings and stream encoding run in the frontend process).

One thread owns the LLMEngine. It drains the frontend's messages between steps (a reader thread decodes
them off the socket), runs a step, and sends the step's outputs as one `Step` message: every request's new
tokens and finishes, the requests it refused, the step's KV events. Calls (`Call`) run between steps and
answer with a `Reply`; a KV transfer (`send_kv`) runs on a thread of its own (the copies release the GIL)
while the loop goes on stepping.
"""

import logging
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from engine.errors import KVCacheFullError, RequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from kv_transfer.descriptors import HeadSlice, PoolDescriptor, TransferError, shard_plan
from worker.ipc import (
    Abort,
    Add,
    Call,
    Dead,
    Drain,
    FrameReader,
    Hello,
    Load,
    Out,
    Ready,
    Refused,
    Release,
    Reply,
    StartRemote,
    Step,
    ToFrontend,
    decode_to_core,
    frame,
    recv_frames,
)
from worker.shard import EngineShard

log = logging.getLogger("pdserve.worker")
Targets = list[tuple[PoolDescriptor, HeadSlice | None]]
# Another rank's share of a KV transfer, from rank 0: starts it and returns a wait for its bytes written.
RankSender = Callable[[Targets, list[int], list[int], float], Callable[[], int]]
_LATER = object()  # a call that replies by itself, later
_REPORT = object()  # wakes the loop to send the counters (a transfer ended)


def to_out(o: RequestOutput) -> Out:
    lps = [(lp.token_id, lp.logprob, list(lp.top)) for lp in o.logprobs] if o.logprobs else None
    return Out(o.request_id, o.new_token_ids, o.num_output_tokens, o.num_cached_tokens, o.num_prompt_tokens,
               o.finish_reason.value if o.finish_reason is not None else None, lps)


class EngineCore:
    def __init__(self, shard: EngineShard, conn: socket.socket):
        self.shard = shard
        self.engine: LLMEngine = shard.engine
        self.conn = conn
        self.descriptors = [shard.descriptor]  # every rank's pool, rank 0's first (attach_ranks adds the others)
        self.rank_senders: list[RankSender] = []
        self.kv_bytes_sent = 0
        self.error: str | None = None
        self._messages: queue.Queue = queue.Queue()  # decoded frontend messages; None wakes the loop
        self._send_lock = threading.Lock()  # the loop and the transfer threads both send
        self._stop = threading.Event()
        self.ready = threading.Event()  # the frontend serves
        self._draining = False
        self._transfers = ThreadPoolExecutor(4, thread_name_prefix="pdserve-kv")
        self._outs: list[Out] = []  # produced between steps (StartRemote): sent once the messages are drained
        self._refused: list[Refused] = []
        self._loop = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._reader = threading.Thread(target=self._read, name="pdserve-engine-ipc", daemon=True)
        self._calls: dict[str, Callable[..., Any]] = {"reserve_remote": self._reserve_remote, "send_kv": self._send_kv}

    def attach_ranks(self, descriptors: list[PoolDescriptor], senders: list[RankSender]) -> None:
        """The pools and KV senders of ranks 1.. of a tensor/expert-parallel worker."""
        self.descriptors = [self.shard.descriptor, *descriptors]
        self.rank_senders = list(senders)

    def start(self, hello: Hello) -> None:
        self._send(hello)
        self._send(Step([], [], self.engine.block_pool.drain_events(), self._load()))
        self._reader.start()
        self._loop.start()

    def drain(self) -> None:
        """Ask the frontend to finish what is in flight and exit (the loop steps on until it has)."""
        self._draining = True
        self._send(Drain())

    def wait(self, timeout_s: float | None = None) -> bool:
        """Until the loop ends (stop(), the frontend gone, or the engine failed); False on timeout."""
        self._loop.join(timeout_s)
        return not self._loop.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._messages.put(None)
        if self._loop.is_alive() and threading.current_thread() is not self._loop:
            self._loop.join(timeout=30)
        self._transfers.shutdown(wait=False, cancel_futures=True)

    def fail(self, error: BaseException | str) -> None:
        """From any thread: the engine cannot go on (a rank of its group died). The frontend hears it now, even
        while the loop is stuck in a collective; the loop stops."""
        if self.error is None:
            self.error = str(error)
            log.error("engine failed: %s", self.error)
            self._send(Dead(self.error))
        self._stop.set()
        self._messages.put(None)

    # --- the loop ---

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._drain(block=not engine.has_unfinished())
                if self._stop.is_set():
                    break
                if engine.has_unfinished():
                    outputs = engine.step()
                    self._send(Step([to_out(o) for o in outputs], [], engine.block_pool.drain_events(), self._load()))
        except BaseException as e:  # the engine's own failure: every request fails with it
            log.exception("engine loop failed")
            self.fail(f"{type(e).__name__}: {e}")

    def _drain(self, block: bool) -> None:
        try:
            msg = self._messages.get(timeout=0.5) if block else self._messages.get_nowait()
        except queue.Empty:
            return
        while True:
            if msg is not None:
                self._handle(msg)
            try:
                msg = self._messages.get_nowait()
            except queue.Empty:
                break
        # What the messages changed (outputs, refusals, blocks freed by aborts) goes out now, not after a step.
        outs, self._outs, refused, self._refused = self._outs, [], self._refused, []
        self._send(Step(outs, refused, self.engine.block_pool.drain_events(), self._load()))

    def _handle(self, msg) -> None:
        engine = self.engine
        if msg is _REPORT:
            return
        if isinstance(msg, Add):
            try:
                engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.hold_kv)
            except RequestError as e:
                self._refused.append(Refused(msg.request_id, "invalid_request", str(e)))
        elif isinstance(msg, Abort):
            engine.abort_request(msg.request_id)
        elif isinstance(msg, StartRemote):
            lps = [TokenLogprob(t, lp, tuple(tuple(x) for x in top)) for t, lp, top in msg.logprobs]
            try:
                self._outs.append(to_out(engine.start_remote(msg.request_id, msg.first_token, lps)))
            except RequestError as e:  # aborted meanwhile
                self._refused.append(Refused(msg.request_id, "invalid_request", str(e)))
        elif isinstance(msg, Release):
            engine.release_held(msg.request_id)
        elif isinstance(msg, Call):
            self._call(msg)

    def _call(self, msg: Call) -> None:
        try:
            value = self._calls[msg.method](msg.call_id, *msg.args)
        except (RequestError, KVCacheFullError, TransferError, KeyError, TypeError) as e:
            self._send(Reply(msg.call_id, None, (type(e).__name__, str(e))))
            return
        if value is not _LATER:
            self._send(Reply(msg.call_id, value))

    # --- calls (on the loop, between steps) ---

    def _reserve_remote(self, _: int, request_id: str, prompt: list[int], params: dict) -> list:
        """Blocks for a prompt a prefill worker computes: [block ids, prompt tokens already cached here]."""
        req = self.engine.reserve_remote(request_id, prompt, msgspec.convert(params, SamplingParams))
        return [req.block_ids, req.num_cached_tokens]

    def _load(self) -> Load:
        e = self.engine
        return Load(len(e.scheduler.running) + len(e.scheduler.remote), len(e.scheduler.waiting),
                    e.block_pool.num_free_blocks, e.block_pool.num_blocks, e.stats.num_tokens_computed,
                    e.kv_manager.num_hit_tokens, e.stats.num_prompt_tokens, self.kv_bytes_sent, e.stats.num_steps)

    def _send_kv(self, call_id: int, request_id: str, dests: list[dict], dst_block_ids: list[int],
                 skip_blocks: int, timeout_s: float) -> object:
        """Write a held request's blocks (past the first skip_blocks) into a decode worker's pools, one a rank:
        each of this worker's ranks sends the heads it holds, concurrently, off the loop. Replies the bytes."""
        blocks = self.engine.held_blocks(request_id)
        if blocks is None:
            raise TransferError("the prefilled blocks are gone (cancelled)")
        src, dst = blocks[skip_blocks:], dst_block_ids[skip_blocks:]
        if len(src) != len(dst):
            raise TransferError(f"{len(dst)} destination blocks for {len(src)} prefilled blocks")
        pools = [PoolDescriptor.from_dict(d) for d in dests]
        self._transfers.submit(self._transfer, call_id, pools, src, dst, timeout_s)
        return _LATER

    def _transfer(self, call_id: int, dests: list[PoolDescriptor], src: list[int], dst: list[int],
                  timeout_s: float) -> None:
        try:
            plan = shard_plan(self.descriptors, dests)
            waits = [start(targets, src, dst, timeout_s)
                     for start, targets in zip(self.rank_senders, plan[1:], strict=True) if targets]
            sent = self.shard.send(plan[0], src, dst, timeout_s) if plan[0] else 0
            sent += sum(wait() for wait in waits)
        except Exception as e:  # any rank's failure fails the transfer; the caller frees the request
            error = e if isinstance(e, TransferError) else TransferError(f"{type(e).__name__}: {e}")
            self._send(Reply(call_id, None, ("TransferError", str(error))))
            return
        self.kv_bytes_sent += sent
        self._send(Reply(call_id, sent))
        self._messages.put(_REPORT)

    # --- the socket ---

    def _read(self) -> None:
        reader = FrameReader()
        while True:
            try:
                bodies = recv_frames(self.conn, reader)
            except OSError:
                bodies = None
            if bodies is None:  # the frontend is gone: nothing can reach this engine any more
                if not self._stop.is_set() and not self._draining:
                    log.warning("the frontend process closed its connection; stopping the engine")
                self._stop.set()
                self._messages.put(None)
                return
            for body in bodies:
                msg = decode_to_core(body)
                if isinstance(msg, Ready):
                    self.ready.set()
                else:
                    self._messages.put(msg)

    def _send(self, msg: ToFrontend) -> None:
        data = frame(msg)
        with self._send_lock:
            try:
                self.conn.sendall(data)
            except OSError:  # the frontend is gone; the reader sees it and stops the loop
                self._stop.set()
                self._messages.put(None)
