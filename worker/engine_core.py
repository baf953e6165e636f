"""A worker's engine core: the loop that schedules and launches steps, in rank 0's process, where nothing
per-token takes its GIL (HTTP, detokenizing, stop strings and stream encoding run in the frontend process).

One thread owns the LLMEngine. It takes the frontend's messages between steps (a reader thread decodes
them off the socket), runs a step, and sends the step's outputs as one `Step` message: every request's new
tokens and finishes, the requests it refused, the step's KV events and the engine's counters (so the
frontend answers load polls at once, never waiting for a step). `ReserveRemote` and `SendKV` answer with a
`Reply`; a KV send runs on a thread of its own (the copies release the GIL) while the loop goes on stepping,
and the request's blocks stay held until it has ended, whatever Release or Abort comes meanwhile.
"""

import logging
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.errors import KVCacheFullError, RequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, TokenLogprob
from kv_transfer.descriptors import HeadSlice, PoolDescriptor, TransferError, shard_plan
from worker import ipc
from worker.shard import EngineShard

log = logging.getLogger("pdserve.worker")
Targets = list[tuple[PoolDescriptor, HeadSlice | None]]
# Another rank's share of a KV transfer, from rank 0: starts it and returns a wait for its bytes written.
RankSender = Callable[[Targets, list[int], list[int], float], Callable[[], int]]
_REPLY_ERRORS = (RequestError, KVCacheFullError, TransferError)  # answered by name; the client raises the same


@dataclass(slots=True)
class _TransferEnded:
    """From a transfer thread to the loop: the request's blocks may go now; bytes were written."""

    request_id: str
    bytes_sent: int


def _wire(lps: list[TokenLogprob]) -> list[tuple[int, float, list[tuple[int, float]]]]:
    return [(lp.token_id, lp.logprob, list(lp.top)) for lp in lps]


def _unwire(lps: list[tuple[int, float, list[tuple[int, float]]]]) -> list[TokenLogprob]:
    return [TokenLogprob(t, lp, tuple(tuple(x) for x in top)) for t, lp, top in lps]


def to_out(o: RequestOutput) -> ipc.Out:
    return ipc.Out(o.request_id, o.new_token_ids, o.num_output_tokens, o.num_cached_tokens, o.num_prompt_tokens,
                   o.finish_reason.value if o.finish_reason is not None else None,
                   _wire(o.logprobs) if o.logprobs else None,
                   None if o.prompt_logprobs is None else _wire(o.prompt_logprobs), o.queued_s)


class EngineCore:
    def __init__(self, shard: EngineShard, conn: socket.socket):
        self.shard = shard
        self.engine: LLMEngine = shard.engine
        self.conn = conn
        self.descriptors = [shard.descriptor]  # every rank's pool, rank 0's first (attach_ranks adds the others)
        self.rank_senders: list[RankSender] = []
        self.kv_bytes_sent = 0
        self.error: str | None = None
        self.ready = threading.Event()  # the frontend serves
        self._messages: queue.Queue = queue.Queue()  # decoded frontend messages; None wakes the loop
        self._send_lock = threading.Lock()  # the loop, the transfer threads and fail() all send
        self._stop = threading.Event()
        self._frontend_leaving = False
        self._transfers = ThreadPoolExecutor(4, thread_name_prefix="pdserve-kv")
        # Requests whose KV is being sent, with the Release/Abort that came meanwhile (run once it has ended).
        self._sending: dict[str, list] = {}
        self._outs: list[ipc.Out] = []  # produced between steps (StartRemote)
        self._refused: list[ipc.Refused] = []
        self._loop = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._reader = threading.Thread(target=self._read, name="pdserve-engine-ipc", daemon=True)

    def attach_ranks(self, descriptors: list[PoolDescriptor], senders: list[RankSender]) -> None:
        """The pools and KV senders of ranks 1.. of a tensor/expert-parallel worker."""
        self.descriptors = [self.shard.descriptor, *descriptors]
        self.rank_senders = list(senders)

    def start(self, hello: ipc.Hello) -> None:
        self._send(hello)
        self._send(ipc.Step([], [], self.engine.block_pool.drain_events(), self._load()))
        self._reader.start()
        self._loop.start()

    def ask_frontend_to_exit(self) -> None:
        """The frontend finishes what is in flight and exits (the loop steps on until it has)."""
        self._frontend_leaving = True
        self._send(ipc.Drain())

    def wait(self, timeout_s: float | None = None) -> bool:
        """Until the loop ends (stop(), the frontend gone, or the engine failed); False on timeout."""
        self._loop.join(timeout_s)
        return not self._loop.is_alive()

    @property
    def running(self) -> bool:
        """Its loop thread is alive (stop() waits for it, for a while)."""
        return self._loop.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._messages.put(None)
        if self._loop.is_alive() and threading.current_thread() is not self._loop:
            self._loop.join(timeout=30)
        self._transfers.shutdown(wait=True, cancel_futures=True)  # none left writing when the transport closes

    def fail(self, error: BaseException | str) -> None:
        """From any thread: the engine cannot go on (a rank of its group died). The frontend hears it now, even
        while the loop is stuck in a collective; the loop stops."""
        if self.error is None:
            self.error = str(error)
            log.error("engine failed: %s", self.error)
            self._send(ipc.Dead(self.error))
        self._stop.set()
        self._messages.put(None)

    # --- the loop ---

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._take_messages(block=not engine.has_unfinished())
                if self._stop.is_set():
                    break
                if engine.has_unfinished():
                    outputs = engine.step()
                    self._send(ipc.Step([to_out(o) for o in outputs], [], engine.block_pool.drain_events(),
                                        self._load()))
        except BaseException as e:  # the engine's own failure: every request fails with it
            log.exception("engine loop failed")
            self.fail(f"{type(e).__name__}: {e}")

    def _take_messages(self, block: bool) -> None:
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
        # What the messages produced goes out now; what they changed otherwise (blocks an abort freed) goes
        # with the next step's message, or now if no step follows.
        if self._outs or self._refused or not self.engine.has_unfinished():
            outs, self._outs, refused, self._refused = self._outs, [], self._refused, []
            self._send(ipc.Step(outs, refused, self.engine.block_pool.drain_events(), self._load()))

    def _handle(self, msg: object) -> None:
        """One message. A failure is the request's (refused, or answered with the error), not the engine's."""
        rid = getattr(msg, "request_id", None)
        if rid in self._sending and isinstance(msg, ipc.Release | ipc.Abort):
            self._sending[rid].append(msg)  # its blocks are being read: they go once the send has ended
            return
        try:
            self._apply(msg)
        except Exception as e:
            if not isinstance(e, _REPLY_ERRORS):
                log.exception("request %s: %s failed", rid, type(msg).__name__)
            if isinstance(msg, ipc.Call):
                self._send(ipc.Reply(msg.call_id, None, (type(e).__name__, str(e))))
            elif rid is not None:
                kind = "invalid_request" if isinstance(e, RequestError) else "engine_error"
                self._refused.append(ipc.Refused(rid, kind, str(e)))

    def _apply(self, msg: object) -> None:
        engine = self.engine
        if isinstance(msg, ipc.Add):
            engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.hold_kv, msg.resumed)
        elif isinstance(msg, ipc.Abort):
            engine.abort_request(msg.request_id)
        elif isinstance(msg, ipc.StartRemote):
            prompt = None if msg.prompt_logprobs is None else _unwire(msg.prompt_logprobs)
            self._outs.append(to_out(engine.start_remote(msg.request_id, msg.first_token, _unwire(msg.logprobs),
                                                         prompt)))
        elif isinstance(msg, ipc.Release):
            engine.release_held(msg.request_id)
        elif isinstance(msg, ipc.ReserveRemote):
            req = engine.reserve_remote(msg.request_id, msg.prompt_token_ids, msg.params, msg.resumed)
            self._send(ipc.Reply(msg.call_id, [req.block_ids, req.num_cached_tokens]))
        elif isinstance(msg, ipc.SendKV):
            self._start_send(msg)
        elif isinstance(msg, ipc.AdapterCall):
            if msg.path is None:
                engine.unload_adapter(msg.name)
            else:
                engine.load_adapter(msg.name, msg.path)
            self._send(ipc.Reply(msg.call_id, engine.adapter_roots()))
        elif isinstance(msg, _TransferEnded):
            self.kv_bytes_sent += msg.bytes_sent
            for deferred in self._sending.pop(msg.request_id, []):
                self._handle(deferred)

    def _load(self) -> ipc.Load:
        e = self.engine
        tier = e.host_tier
        return ipc.Load(len(e.scheduler.running) + len(e.scheduler.remote), len(e.scheduler.waiting),
                        e.block_pool.num_free_blocks, e.block_pool.num_blocks, e.stats.num_tokens_computed,
                        e.kv_manager.num_hit_tokens, e.stats.num_prompt_tokens, self.kv_bytes_sent,
                        e.stats.num_steps, len(tier.slots) if tier else 0, tier.num_blocks if tier else 0,
                        e.kv_manager.num_tier_hit_tokens)

    # --- KV sends (started on the loop, run off it) ---

    def _start_send(self, msg: ipc.SendKV) -> None:
        """Each of this worker's ranks sends the heads it holds, concurrently, off the loop."""
        if msg.request_id in self._sending:
            raise TransferError(f"request {msg.request_id!r} is already being sent")
        blocks = self.engine.held_blocks(msg.request_id)
        if blocks is None:
            raise TransferError("the prefilled blocks are gone (cancelled)")
        src, dst = blocks[msg.skip_blocks:], msg.dst_block_ids[msg.skip_blocks:]
        if len(src) != len(dst):
            raise TransferError(f"{len(dst)} destination blocks for {len(src)} prefilled blocks")
        pools = [PoolDescriptor.from_dict(d) for d in msg.dests]
        self._sending[msg.request_id] = []
        self._transfers.submit(self._transfer, msg, pools, src, dst)

    def _transfer(self, msg: ipc.SendKV, dests: list[PoolDescriptor], src: list[int], dst: list[int]) -> None:
        sent = 0
        try:
            plan = shard_plan(self.descriptors, dests)
            waits = [start(targets, src, dst, msg.timeout_s)
                     for start, targets in zip(self.rank_senders, plan[1:], strict=True) if targets]
            sent = self.shard.send(plan[0], src, dst, msg.timeout_s) if plan[0] else 0
            sent += sum(wait() for wait in waits)
        except Exception as e:  # any rank's failure fails the transfer; the caller frees the request
            self._send(ipc.Reply(msg.call_id, None, ("TransferError", f"{type(e).__name__}: {e}")))
        else:
            self._send(ipc.Reply(msg.call_id, sent))
        finally:
            self._messages.put(_TransferEnded(msg.request_id, sent))

    # --- the socket ---

    def _read(self) -> None:
        reader = ipc.FrameReader()
        try:
            while (bodies := ipc.recv_frames(self.conn, reader)) is not None:
                for body in bodies:
                    msg = ipc.decode_to_core(body)
                    if isinstance(msg, ipc.Ready):
                        self.ready.set()
                    else:
                        self._messages.put(msg)
        except OSError:
            pass  # the frontend is gone, as at the end of its stream
        except Exception as e:  # a message the core cannot read: nothing after it can be trusted
            log.exception("the frontend's messages cannot be read")
            self.fail(f"unreadable message from the frontend: {e!r}")
            return
        if not self._stop.is_set() and not self._frontend_leaving:
            log.warning("the frontend process closed its connection; stopping the engine")
        self._stop.set()
        self._messages.put(None)

    def _send(self, msg: ipc.ToFrontend) -> None:
        data = ipc.frame(msg)
        with self._send_lock:
            try:
                self.conn.sendall(data)
            except OSError:  # the frontend is gone; the reader sees it and stops the loop
                self._stop.set()
                self._messages.put(None)
