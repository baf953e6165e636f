"""What a worker's engine core and its frontend process say to each other, and how it is framed on their socket.

The core (rank 0's process: the loop that schedules and launches steps) sends one `Step` a step: every
request's new tokens, finishes and logprobs, the requests it refused, and the KV events of the step. The
frontend (HTTP, detokenizing, stop strings, stream encoding) sends requests in, aborts, and calls that
answer with a `Reply`. A frame is a 4-byte big-endian length and a msgpack body (msgspec structs, encoded
as arrays: no field names on the wire). Torch-free: the frontend imports it.
"""

import socket
import struct
from typing import Any

import msgspec

from engine.sampling_params import SamplingParams
from protocol.kv_events import KVEvent
from protocol.messages import WorkerLoad, struct_of
from worker.config import WorkerConfig

_LENGTH = struct.Struct("!I")
MAX_FRAME_BYTES = 1 << 30


class _Message(msgspec.Struct, array_like=True, tag=True, omit_defaults=False):
    pass


# --- frontend -> core ---

class Add(_Message):
    """Queue a request; with hold_kv (a prefill worker's), its blocks stay held after it ends until Release."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    hold_kv: bool = False
    resumed: list[int] = []  # outputs a migrated stream already delivered (LLMEngine.add_request)


class Abort(_Message):
    """End a request now and free its blocks (the client left, or the frontend matched a stop string)."""

    request_id: str


class StartRemote(_Message):
    """The prompt's KV is in the blocks reserve_remote gave: emit the prefill's first token and decode on."""

    request_id: str
    first_token: int
    logprobs: list[tuple[int, float, list[tuple[int, float]]]]
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None  # computed by the prefill


class Release(_Message):
    """A prefill worker is done with a held request's blocks."""

    request_id: str


class ReserveRemote(_Message):
    """Reserve blocks for a prompt a prefill worker computes. Reply: [block ids, prompt tokens cached here]."""

    call_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    resumed: list[int] = []


class SendKV(_Message):
    """Write a held request's blocks (past the first skip_blocks) into a decode worker's pools, one a rank.
    Reply: the bytes written. The request's blocks stay held until the write has ended, even if a Release or
    an Abort comes meanwhile."""

    call_id: int
    request_id: str
    dests: list[dict[str, Any]]  # kv_transfer PoolDescriptor dicts, rank 0's first
    dst_block_ids: list[int]
    skip_blocks: int
    timeout_s: float


class AdapterCall(_Message):
    """Serve the LoRA adapter folder at `path` as `name`, or (path None) stop taking new requests for it.
    Reply: every adapter served, name -> its block hash root."""

    call_id: int
    name: str
    path: str | None


class Ready(_Message):
    """The frontend serves on the worker's port."""


Call = ReserveRemote | SendKV | AdapterCall  # the messages answered by a Reply with their call_id
ToCore = Add | Abort | StartRemote | Release | ReserveRemote | SendKV | AdapterCall | Ready


# --- core -> frontend ---

class Hello(_Message):
    """The core's first message: what the frontend serves about it."""

    config: WorkerConfig  # the internal token included: this socket is the two processes' own
    info: dict[str, Any]  # protocol.messages.WorkerInfo's fields
    tokenizer_files: dict[str, str]
    descriptors: list[dict[str, Any]]  # every rank's KV pool (kv_transfer PoolDescriptor dicts), rank 0's first
    adapters: dict[str, int] = {}  # LoRA adapters served from the start: name -> block hash root


class Out(_Message):
    """A request's output of one step (or of StartRemote, or an abort's last word)."""

    request_id: str
    token_ids: list[int]
    num_output_tokens: int  # so far, these included
    num_cached_tokens: int
    num_prompt_tokens: int
    finish_reason: str | None  # set on the request's last output: "stop" (eos, stop token), "length", "abort"
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None  # [(token, logprob, top)]
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None  # with the first token, if asked
    queued_s: float | None = None  # once: seconds from its arrival in the engine to its first step


class Refused(_Message):
    """A request the engine would not run (RequestError: too long, bad ids); it never started."""

    request_id: str
    kind: str  # "invalid_request" (the engine's RequestError), or "engine_error" (anything else it raised)
    message: str


# The engine's counters (WorkerLoad's fields, in order), as of the message carrying them.
Load = struct_of(WorkerLoad, "Load", array_like=True)


class Step(_Message):
    """A step's outputs (or what messages between steps produced), and the engine's counters after it."""

    outs: list[Out]
    refused: list[Refused] = []
    events: list[KVEvent] = []
    load: Load | None = None


class Reply(_Message):
    call_id: int
    value: Any = None
    error: tuple[str, str] | None = None  # (exception class name, message)


class Dead(_Message):
    """The engine cannot go on (its loop failed, or a rank of its group died)."""

    message: str


class Drain(_Message):
    """Stop taking requests, let those in flight finish (up to the config's drain_timeout_s), then exit."""


ToFrontend = Hello | Step | Reply | Dead | Drain

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
decode_to_core = msgspec.msgpack.Decoder(ToCore).decode
decode_to_frontend = msgspec.msgpack.Decoder(ToFrontend).decode


def frame(message: msgspec.Struct) -> bytes:
    body = encode(message)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into frame bodies (either side; feed it what the socket gave)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        bodies, pos, end = [], 0, len(buf)
        while end - pos >= 4:
            (n,) = _LENGTH.unpack_from(buf, pos)
            if n > MAX_FRAME_BYTES:
                raise ValueError(f"a frame of {n} bytes")
            if end - pos - 4 < n:
                break
            bodies.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        return bodies


def recv_frames(sock: socket.socket, reader: FrameReader) -> list[bytes] | None:
    """Blocking: the next frames from sock (at least one), or None once the peer has closed it."""
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return None
        bodies = reader.feed(data)
        if bodies:
            return bodies
