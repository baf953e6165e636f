"""Messages on the workers' internal API, shared by the router and the workers (pydantic, torch-free).

The pydantic models are the schema the workers validate. The router, for which each microsecond a request
counts, writes its requests and reads the chunks through msgspec structs with the same fields (`ParamsOut`,
`GenerateOut`, `PrefillOut`, `ChunkView`)."""

from typing import Any

import msgspec
from pydantic import BaseModel, Field


class WireSamplingParams(BaseModel):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True


class PrefillRequest(BaseModel):
    request_id: str
    prompt_token_ids: list[int]
    params: WireSamplingParams


class SendRequest(BaseModel):
    """From a decode worker to a prefill worker: where to write the request's KV."""

    request_id: str
    dest: dict[str, Any]  # kv_transfer PoolDescriptor as a dict (rank 0's pool)
    # Every rank's pool of a tensor-parallel decode worker, rank 0's first (empty: dest is the only one).
    dests: list[dict[str, Any]] = []
    dst_block_ids: list[int]
    skip_blocks: int  # leading blocks the decode worker already holds


class TokenLogprobWire(BaseModel):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = Field(default_factory=list)


class SendResult(BaseModel):
    first_token: int
    logprobs: list[TokenLogprobWire] = Field(default_factory=list)
    num_blocks_sent: int


class GenerateRequest(BaseModel):
    request_id: str
    prompt_token_ids: list[int]
    params: WireSamplingParams
    prefill_url: str | None = None  # None: prefill here (conditional disaggregation)


class GenerateChunk(BaseModel):
    """One line of a decode worker's NDJSON stream."""

    token_ids: list[int] = Field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[TokenLogprobWire] = Field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: dict[str, Any] | None = None  # {"message", "type", "code"} when the request failed


class LogprobView(msgspec.Struct, frozen=True):
    """TokenLogprobWire as the router reads it (ChunkView)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class ChunkView(msgspec.Struct):
    """A GenerateChunk line as the router reads it, once a token a stream: msgspec decodes one in ~1 us where
    pydantic takes ~5. The same fields and defaults as GenerateChunk (tests/protocol/test_messages.py holds
    them in step); decode_chunk raises ValueError on a line that is not one."""

    token_ids: list[int] = []
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[LogprobView] = []
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: dict[str, Any] | None = None


decode_chunk = msgspec.json.Decoder(ChunkView).decode


class ParamsOut(msgspec.Struct, kw_only=True):
    """WireSamplingParams as the router writes it (GenerateOut, PrefillOut): a msgspec struct is built and
    encoded in ~2 us where pydantic takes ~5, and most of a request's router time is such steps. The same
    fields and defaults as WireSamplingParams (tests/protocol/test_messages.py holds them in step)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True


class GenerateOut(msgspec.Struct):
    """GenerateRequest as the router writes it (`encode_out`)."""

    request_id: str
    prompt_token_ids: list[int]
    params: ParamsOut
    prefill_url: str | None = None


class PrefillOut(msgspec.Struct):
    """PrefillRequest as the router writes it (`encode_out`)."""

    request_id: str
    prompt_token_ids: list[int]
    params: ParamsOut


encode_out = msgspec.json.Encoder().encode


class WorkerInfo(BaseModel):
    role: str  # "prefill" | "decode"
    name: str
    model: str
    block_size: int
    root_hash: int
    max_model_len: int
    tokenizer_hash: str


class WorkerLoad(BaseModel):
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    tokens_computed: int
    prompt_tokens_cached: int
    prompt_tokens: int = 0  # of the requests it admitted (hit ratio = prompt_tokens_cached / prompt_tokens)
    kv_bytes_sent: int = 0  # KV it wrote to decode workers (a prefill worker's transfer volume)
    steps: int = 0  # engine steps run (tokens_computed / steps: the mean batch)
