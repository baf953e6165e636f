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
    prompt_logprobs: int | None = None  # the prompt's (completions' echo with logprobs), computed at prefill
    skip_special_tokens: bool = True
    grammar: tuple[str, str] | None = None  # (kind, source), protocol/grammar.py
    logit_bias: list[tuple[int, float]] = Field(default_factory=list)
    priority: int = 0  # lower first (the router's: its key's, or a request's the key allows)
    tenant: str = ""  # whose request (an API key's id): equal priorities share the workers fairly by it
    adapter: str | None = None  # the LoRA adapter it runs with (a name the worker serves); None: the base model


class PrefillRequest(BaseModel):
    request_id: str
    prompt_token_ids: list[int]
    params: WireSamplingParams
    # A migrated stream's tokens already delivered: computed with the prompt; the first token sampled follows them.
    output_token_ids: list[int] = Field(default_factory=list)
    traceparent: str | None = None  # W3C trace context of the router's span this request's spans go under


class SendRequest(BaseModel):
    """From a decode worker to a prefill worker: where to write the request's KV."""

    request_id: str
    dest: dict[str, Any]  # kv_transfer PoolDescriptor as a dict (rank 0's pool)
    # Every rank's pool of a tensor-parallel decode worker, rank 0's first (empty: dest is the only one).
    dests: list[dict[str, Any]] = []
    dst_block_ids: list[int]
    skip_blocks: int  # leading blocks the decode worker already holds
    traceparent: str | None = None  # the decode worker's span the KV transfer's goes under (when traced)


class TokenLogprobWire(BaseModel):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = Field(default_factory=list)


class SendResult(BaseModel):
    first_token: int
    logprobs: list[TokenLogprobWire] = Field(default_factory=list)
    prompt_logprobs: list[TokenLogprobWire] | None = None  # when asked: the prompt's tokens after the first
    num_blocks_sent: int


class GenerateRequest(BaseModel):
    request_id: str
    prompt_token_ids: list[int]
    params: WireSamplingParams
    prefill_url: str | None = None  # None: prefill here (conditional disaggregation)
    # The caller's open token channel (GET /channel/{id}) that the chunks go out on; None: this response
    # streams them itself (NDJSON, a JSON list of chunks a line).
    channel: str | None = None
    # A stream migrated from a failed decode worker: the tokens it already delivered. They are this request's
    # first outputs (they count toward max_tokens, penalties, seeds' positions, a grammar and the usage); the
    # chunks carry only what follows them.
    output_token_ids: list[int] = Field(default_factory=list)
    traceparent: str | None = None  # W3C trace context of the router's span this request's spans go under


class GenerateChunk(BaseModel):
    """A request's output of one engine step. A decode worker sends every chunk of one step for one router as
    one frame: a line holding the JSON list of them, on that router's channel."""

    request_id: str = ""
    token_ids: list[int] = Field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[TokenLogprobWire] = Field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: dict[str, Any] | None = None  # {"message", "type", "code"} when the request failed
    stop_reason: str | None = None  # the stop string that ended it (vLLM's stop_reason), if one did
    # params.prompt_logprobs: with the first chunk, the prompt's tokens after the first
    prompt_logprobs: list[TokenLogprobWire] | None = None


def struct_of(model: type[BaseModel], name: str, frozen: bool = False, array_like: bool = False,
              **types: Any) -> type[msgspec.Struct]:
    """A msgspec struct with the model's fields, in order, and defaults (`types` replaces a field's type: a
    nested model by its struct). The router builds and reads worker messages through such structs: msgspec
    decodes a chunk in ~1 us where pydantic takes ~5, and builds and encodes a request in ~2 against ~5;
    most of a request's router time is such steps."""
    fields = []
    for field_name, info in model.model_fields.items():
        kind = types.get(field_name, info.annotation)
        if info.is_required():
            fields.append((field_name, kind))
        elif info.default_factory is not None:
            fields.append((field_name, kind, msgspec.field(default_factory=info.default_factory)))
        else:
            fields.append((field_name, kind, info.default))
    return msgspec.defstruct(name, fields, frozen=frozen, array_like=array_like, module=__name__)


# How a decode worker writes its chunks and the router reads them (decode_frame raises ValueError on a line that
# is not a frame: a JSON list of chunks)
LogprobView = struct_of(TokenLogprobWire, "LogprobView", frozen=True)
ChunkView = struct_of(GenerateChunk, "ChunkView", logprobs=list[LogprobView],
                      prompt_logprobs=list[LogprobView] | None)
decode_frame = msgspec.json.Decoder(list[ChunkView]).decode
_frame_encoder = msgspec.json.Encoder()


def encode_frame(chunks: list) -> bytes:
    """A frame's line: the JSON list of the chunks, newline-terminated (JSON text holds no raw newline)."""
    return _frame_encoder.encode(chunks) + b"\n"

# How the router writes its requests to workers (encode_out)
ParamsOut = struct_of(WireSamplingParams, "ParamsOut")
GenerateOut = struct_of(GenerateRequest, "GenerateOut", params=ParamsOut)
PrefillOut = struct_of(PrefillRequest, "PrefillOut", params=ParamsOut)
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
    host_blocks: int = 0  # the host KV tier: blocks it holds, of host_blocks_total (0: no tier)
    host_blocks_total: int = 0
    host_hit_tokens: int = 0  # prompt tokens loaded back from it (of prompt_tokens_cached)
    adapters: dict[str, int] = {}  # LoRA adapters it serves: name -> the root of their block hash chains
