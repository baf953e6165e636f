"""Batched sampling as tensor ops: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

Random draws come from a counter-based hash of (request seed, output position, token id), so a seeded
request samples the same tokens whatever else is in its batch, and after preemption, with no generator
state and no host round trip per request.
"""

from dataclasses import dataclass

import torch

from engine.device import to_device, to_host
from engine.request import Request

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # int64 tensor holding values in [0, 2^32): a 32-bit integer mix (products stay below 2^59).
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[batch, vocab] uniforms in (0, 1), a pure function of (seed, step, token id)."""
    key = _hash32(_hash32(seeds & _MASK32) ^ (seeds >> 32) ^ _hash32(steps & _MASK32))
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = _hash32(key[:, None] ^ _hash32(ids + 0x9E3779B9)[None, :])
    return (x.to(torch.float64) + 0.5).div_(2.0**32).float()


@dataclass(slots=True)
class SamplingBatch:
    """Per-row parameters of the requests sampled this step, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float, 0 for greedy rows
    top_k: torch.Tensor  # [B] int64, vocab size when off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    presence: torch.Tensor  # [B] float
    frequency: torch.Tensor  # [B] float
    repetition: torch.Tensor  # [B] float
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64, number of output tokens so far
    output_counts: torch.Tensor | None  # [B, V] float counts of each output token, when penalties are on
    seen_tokens: torch.Tensor | None  # [B, V] bool, prompt or output token, for repetition penalty
    num_logprobs: int | None  # max top alternatives asked by any row, None when no row wants logprobs
    any_sampling: bool
    any_top_k_p: bool
    any_min_p: bool
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # logit_bias: (rows, token ids, values)

    @classmethod
    def build(cls, reqs: list[Request], vocab_size: int, device: torch.device) -> "SamplingBatch":
        ps = [r.params for r in reqs]

        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, device, dtype)

        any_penalty = any(p.uses_penalties for p in ps)
        output_counts = seen = None
        if any_penalty:
            output_counts = torch.zeros(len(reqs), vocab_size, device=device)
            seen = torch.zeros(len(reqs), vocab_size, dtype=torch.bool, device=device)
            for row, r in enumerate(reqs):  # building counts is bookkeeping, not the tensor hot path
                if r.output_token_ids:
                    out = col(r.output_token_ids, torch.int64)
                    output_counts[row].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
                seen[row, col(r.all_token_ids, torch.int64)] = True
        wants = [p.logprobs for p in ps if p.logprobs is not None]
        bias = None
        if any(p.logit_bias for p in ps):
            entries = [(row, t, v) for row, p in enumerate(ps) for t, v in p.logit_bias]
            bias = tuple(col([e[i] for e in entries], dtype)
                         for i, dtype in enumerate((torch.int64, torch.int64, torch.float32)))
        return cls(
            temperature=col([p.temperature for p in ps], torch.float32),
            top_k=col([p.top_k or vocab_size for p in ps], torch.int64),
            top_p=col([p.top_p for p in ps], torch.float32),
            min_p=col([p.min_p for p in ps], torch.float32),
            presence=col([p.presence_penalty for p in ps], torch.float32),
            frequency=col([p.frequency_penalty for p in ps], torch.float32),
            repetition=col([p.repetition_penalty for p in ps], torch.float32),
            seeds=col([r.seed for r in reqs], torch.int64),
            steps=col([len(r.output_token_ids) for r in reqs], torch.int64),
            output_counts=output_counts,
            seen_tokens=seen,
            num_logprobs=max(wants) if wants else None,
            bias=bias,
            any_sampling=any(not p.greedy for p in ps),
            any_top_k_p=any(p.top_k or p.top_p < 1.0 for p in ps if not p.greedy),
            any_min_p=any(p.min_p > 0 for p in ps if not p.greedy),
        )


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] logprob of the chosen token
    top_ids: torch.Tensor | None  # [B, k]
    top_logprobs: torch.Tensor | None  # [B, k]

    def copy_to_host(self) -> "HostSamples":
        """Start copying to the host without waiting (pinned buffers, CUDA); HostSamples.lists() waits."""
        if self.token_ids.device.type != "cuda":
            return HostSamples(self, None)
        host = SamplerOutput(*(None if t is None else to_host(t)
                               for t in (self.token_ids, self.logprobs, self.top_ids, self.top_logprobs)))
        done = torch.cuda.Event()
        done.record()
        return HostSamples(host, done)


@dataclass(slots=True)
class HostSamples:
    """A step's samples on their way to the host (done: the copy's event, None when already there)."""

    out: SamplerOutput
    done: "torch.cuda.Event | None"

    def lists(self) -> tuple[list[int], list | None, list | None, list | None]:
        """(tokens, chosen logprobs, top ids, top logprobs) as lists: the step's one host sync."""
        if self.done is not None:
            self.done.synchronize()
        o = self.out
        return tuple(t.tolist() if t is not None else None  # type: ignore[return-value]
                     for t in (o.token_ids, o.logprobs, o.top_ids, o.top_logprobs))


def sample(logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
    """logits: [B, V] float32 -> one token a row. Logprobs are of the logits after logit_bias (and a grammar's
    mask, applied before), before penalties and temperature."""
    if b.bias is not None:
        logits = logits.index_put(b.bias[:2], b.bias[2], accumulate=True)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if b.num_logprobs is not None else None
    if b.seen_tokens is not None:
        rep = b.repetition[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(b.seen_tokens, penalised, logits)
        logits = logits - b.frequency[:, None] * b.output_counts - b.presence[:, None] * (b.output_counts > 0)
    tokens = logits.argmax(dim=-1)
    if b.any_sampling:
        greedy = b.temperature == 0
        scaled = logits / torch.where(greedy, 1.0, b.temperature)[:, None]
        if b.any_top_k_p:
            scaled = _top_k_top_p(scaled, b.top_k, b.top_p)
        probs = torch.softmax(scaled, dim=-1)
        if b.any_min_p:
            probs = probs.masked_fill(probs < b.min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        exp_noise = -torch.log(uniform_noise(b.seeds, b.steps, logits.shape[-1]))
        sampled = (probs / exp_noise).argmax(dim=-1)
        tokens = torch.where(greedy, tokens, sampled)
    if raw_logprobs is None:
        return SamplerOutput(tokens, None, None, None)
    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    top = raw_logprobs.topk(b.num_logprobs, dim=-1) if b.num_logprobs else None
    return SamplerOutput(tokens, chosen, top.indices if top else None, top.values if top else None)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the token that crosses it is kept).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
