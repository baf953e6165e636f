"""A request's state inside the engine: its tokens, blocks and progress."""

import time
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from engine.sampling_params import SamplingParams


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(StrEnum):
    STOP = "stop"  # eos, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled, or failed


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # params.seed, or a random one drawn at arrival: sampling is reproducible per request
    arrival_index: int
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of every full block of all_token_ids so far
    num_computed_tokens: int = 0  # tokens whose KV is in block_ids
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_committed_blocks: int = 0  # leading blocks already registered in the prefix cache
    num_preemptions: int = 0
    hold_kv: bool = False  # a prefill worker's request: blocks stay referenced after it ends, until sent
    matcher: Any = None  # its grammar's matcher (engine/guided.py), when its output follows one
    # params.prompt_logprobs: those of the prompt's tokens after the first, as computed (engine/outputs.py's
    # TokenLogprob); reported with the first output, then None
    prompt_logprobs: list | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # Seconds from its arrival to its first step (set then), reported once with its next output (traces)
    queued_s: float | None = None
    queue_reported: bool = False
    counted: bool = False  # in the scheduler's per-tenant counts (once requests carry priorities or tenants)
    adapter: Any = None  # its LoRA adapter (engine/lora.py's Adapter), if it names one
    lora_slot: int = -1  # the device slot holding its adapter, while it is admitted
    root_hash: int | None = None  # its block hash chain's root, if not the engine's (an adapter's)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (the decode hot path)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
