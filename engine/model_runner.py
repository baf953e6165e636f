"""Runs one scheduled step: packs the batch, plans attention once, runs the model, samples.

The step's metadata is built on the host with numpy and copied to the device once; decode-only steps on
CUDA replay a captured graph. The only host sync is reading the sampled tokens back, in the engine. A step
may be launched before the host knows the previous step's tokens (the engine's overlapped scheduling):
those inputs are placeholders (PLACEHOLDER) filled on the device from the previous step's samples.
With several ranks (tensor/expert parallel), rank 0 broadcasts each step's StepInput and every rank runs
the same forward (its collectives meet the others'); only rank 0 samples.
"""

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import BatchMetadata
from engine.device import pinned, to_device
from engine.guided import GrammarMasks, apply_masks
from engine.lora import LoraSlots
from engine.model import CausalLM
from engine.outputs import TokenLogprob
from engine.parallel import SINGLE, Parallel
from engine.request import Request
from engine.sampler import SamplerOutput, SamplingBatch, sample
from engine.scheduler import ScheduledBatch

PLACEHOLDER = -1  # a token sampled by a step whose results the host has not read yet


@dataclass(slots=True)
class PrevTokens:
    """The previous step's sampled ids, still on the device, and which row holds each request's."""

    token_ids: torch.Tensor  # [rows] int64
    rows: dict[str, int]  # request id -> row


@dataclass(slots=True)
class StepInput:
    """One step's batch as plain host arrays, all a rank needs to run its forward."""

    starts: np.ndarray  # [num_seqs] int64, tokens of each request already in the KV cache
    lens: np.ndarray  # [num_seqs] int64, tokens computed this step
    input_ids: np.ndarray  # [num_tokens] int64
    block_ids: np.ndarray  # [total blocks] int64, each request's blocks covering starts + lens, in order
    sample_rows: list[int]  # requests whose last known token is computed this step
    # Placeholder inputs: their positions in input_ids and the rows of the previous step's samples to take.
    fill_at: np.ndarray | None = None
    fill_from: np.ndarray | None = None
    share_samples: bool = False  # rank 0 broadcasts this step's sampled ids to the other ranks after it
    prompt_logprobs: "PromptLogprobsInput | None" = None  # rows whose prompt's logprobs this step computes
    lora_slots: np.ndarray | None = None  # [num_seqs] int64, each request's adapter slot (-1: none); None: no adapter
    lora_places: list[tuple[int, str, str]] | None = None  # slots rank 0 refilled: (slot, name, folder), for the others


@dataclass(slots=True)
class PromptLogprobsInput:
    """Where a step computes prompt logprobs: each computed prompt token whose next token is a prompt token too."""

    index: np.ndarray  # [n] int64, the tokens' places in the step's input_ids
    targets: np.ndarray  # [n] int64, the prompt token after each (whose logprob is taken)
    counts: list[tuple[int, int]]  # (the request's place in the step, how many of the n are its), in order
    top: int  # alternatives to report, the most any of the requests asked


@dataclass(slots=True)
class PromptLogprobs:
    """A step's computed prompt logprobs on the device, in PromptLogprobsInput's order."""

    chosen: torch.Tensor  # [n] float32
    top_ids: torch.Tensor | None  # [n, top] int64
    top_logprobs: torch.Tensor | None  # [n, top] float32


@dataclass(slots=True)
class Forward:
    """A step whose forward is queued on the device and whose sampling may not be yet."""

    batch: ScheduledBatch
    step: StepInput
    reqs: list[Request]  # the requests it samples, in row order
    logits: torch.Tensor | None  # [len(reqs), vocab] (None: it samples nothing)
    sampling: SamplingBatch | None  # the rows' sampling parameters (None: every row is plain greedy)
    prompt: "PromptLogprobs | None"


def step_input(reqs: list[Request], counts: list[int], block_size: int) -> StepInput:
    starts = np.array([r.num_computed_tokens for r in reqs], dtype=np.int64)
    lens = np.array(counts, dtype=np.int64)
    seq_lens = starts + lens
    input_ids = np.concatenate([r.token_slice(s, s + n) for r, s, n in zip(reqs, starts.tolist(), lens.tolist(),
                                                                            strict=True)])
    num_blocks = -(-seq_lens // block_size)
    block_ids = np.concatenate([r.block_ids[:n] for r, n in zip(reqs, num_blocks, strict=True)]).astype(np.int64)
    # Logits only where a request's last known token is computed this step (not mid-prefill chunks).
    sample_rows = [i for i, r in enumerate(reqs) if seq_lens[i] == r.num_tokens]
    step = StepInput(starts, lens, input_ids, block_ids, sample_rows)
    wanting = [i for i, r in enumerate(reqs) if r.prompt_logprobs is not None]
    if wanting:
        step.prompt_logprobs = _prompt_logprobs_input(reqs, wanting, starts, lens)
    return step


def _prompt_logprobs_input(reqs: list[Request], wanting: list[int], starts: np.ndarray, lens: np.ndarray
                           ) -> PromptLogprobsInput | None:
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
    index, targets, counts = [], [], []
    for i in wanting:
        r, start = reqs[i], int(starts[i])
        n = min(int(lens[i]), len(r.prompt_token_ids) - 1 - start)  # positions whose next token is the prompt's
        if n > 0:
            index.append(np.arange(n, dtype=np.int64) + offsets[i])
            targets.append(np.asarray(r.prompt_token_ids[start + 1 : start + 1 + n], dtype=np.int64))
            counts.append((i, n))
    if not counts:
        return None
    top = max(reqs[i].params.prompt_logprobs for i, _ in counts)
    return PromptLogprobsInput(np.concatenate(index), np.concatenate(targets), counts, top)


def build_metadata(step: StepInput, block_size: int, device: torch.device) -> tuple[np.ndarray, BatchMetadata]:
    """Host positions and the device metadata of a step."""
    bs, starts, lens = block_size, step.starts, step.lens
    num_seqs = len(starts)
    seq_lens = starts + lens
    query_start = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(lens, out=query_start[1:])
    # [num_tokens]: positions of the new tokens, request after request.
    positions = np.arange(int(query_start[-1]), dtype=np.int64) - np.repeat(query_start[:-1] - starts, lens)
    num_blocks = -(-seq_lens // bs)
    kv_indptr = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(num_blocks, out=kv_indptr[1:])
    kv_indices = step.block_ids
    tables = np.zeros((num_seqs, int(num_blocks.max())), dtype=np.int64)
    rows = np.repeat(np.arange(num_seqs), num_blocks)
    tables[rows, np.arange(len(kv_indices)) - np.repeat(kv_indptr[:-1], num_blocks)] = kv_indices
    slot_blocks = tables[np.repeat(np.arange(num_seqs), lens), positions // bs]

    def dev(a: np.ndarray) -> torch.Tensor:
        return to_device(a, device)

    def host(a: np.ndarray) -> torch.Tensor:
        return pinned(torch.from_numpy(a), device)

    meta = BatchMetadata(
        query_start_loc=dev(query_start), seq_lens=dev(seq_lens), block_tables=dev(tables),
        slot_blocks=dev(slot_blocks), slot_offsets=dev(positions % bs),
        max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()), is_decode_only=bool((lens == 1).all()),
        kv_indptr_host=host(kv_indptr), kv_indices=dev(kv_indices.astype(np.int32)),
        kv_last_page_len_host=host(((seq_lens - 1) % bs + 1).astype(np.int32)),
        query_start_loc_host=host(query_start.astype(np.int32)),
    )
    return positions, meta


class ModelRunner:
    def __init__(self, model: CausalLM, attention: AttentionBackend, block_size: int, device: torch.device,
                 graphs: "object | None" = None, parallel: Parallel = SINGLE, overlap: bool = False,
                 lora: LoraSlots | None = None):
        """overlap: steps may be launched before the previous step's tokens are read (placeholders); with
        several ranks, rank 0 then broadcasts each step's sampled ids for the others' next inputs. lora: the
        adapters' device slots, when the engine serves adapters."""
        self.model = model
        self.attention = attention
        self.block_size = block_size
        self.device = device
        self.vocab_size = model.config.vocab_size
        self.graphs = graphs  # a CudaGraphDecoder when decode steps replay captured graphs
        self.parallel = parallel
        self.share_samples = overlap and parallel.world_size > 1
        self.lora = lora

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: PrevTokens | None = None) -> Forward:
        """Queue the step's forward on the device; nothing here waits for the device. Its sampling is queued
        by sample(), now or, for a step whose samples wait for grammar masks, once they are filled."""
        step = step_input(batch.requests, batch.num_new_tokens, self.block_size)
        self._plan_fill(step, batch.requests, prev)
        if self.lora is not None:
            slots = np.array([r.lora_slot for r in batch.requests], dtype=np.int64)
            step.lora_slots = slots if (slots >= 0).any() else None
            step.lora_places = self.lora.take_placed()
        step.share_samples = self.share_samples and bool(step.sample_rows)
        if self.parallel.world_size > 1:
            self.parallel.broadcast(step)
        logits, prompt = self._forward(step, prev.token_ids if prev is not None else None)
        reqs = [batch.requests[i] for i in step.sample_rows]
        # The sampling state is taken now, from the outputs before this step's (its placeholders come after).
        plain = logits is None or all(r.params.plain_greedy for r in reqs)
        sampling = None if plain else SamplingBatch.build(reqs, self.vocab_size, self.device)
        return Forward(batch, step, reqs, logits, sampling, prompt)

    @torch.inference_mode()
    def sample(self, fwd: Forward, masks: GrammarMasks | None = None) -> SamplerOutput | None:
        """Queue a launched step's sampling (None: it samples nothing), the grammar masks applied. A step
        computing prompt logprobs reads them here, once its sampling is queued (a host sync)."""
        out = None
        if fwd.logits is not None:
            logits = fwd.logits if masks is None else apply_masks(fwd.logits, masks)
            if fwd.sampling is None:  # every row plain greedy: argmax on the device
                out = SamplerOutput(logits.argmax(dim=-1), None, None, None)
            else:
                out = sample(logits, fwd.sampling)
            if fwd.step.share_samples:
                self.parallel.broadcast_tensor(out.token_ids)
        if fwd.prompt is not None:
            _report_prompt_logprobs(fwd.batch.requests, fwd.step.prompt_logprobs, fwd.prompt)
        return out

    @staticmethod
    def _plan_fill(step: StepInput, reqs: list[Request], prev: PrevTokens | None) -> None:
        """Where the step's placeholder inputs are, and which of the previous step's samples fill them."""
        holes = np.flatnonzero(step.input_ids == PLACEHOLDER)
        if not len(holes):
            return
        if prev is None:
            raise RuntimeError("a placeholder input without the previous step's tokens")
        owners = np.searchsorted(np.cumsum(step.lens), holes, side="right")  # the request each hole is in
        step.fill_at = holes
        step.fill_from = np.array([prev.rows[reqs[i].request_id] for i in owners.tolist()], dtype=np.int64)

    def _forward(self, step: StepInput, prev_tokens: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor | None, PromptLogprobs | None]:
        """Logits of the step's sample rows [len(sample_rows), vocab] (None when no row samples), and the prompt
        logprobs the step computes (None: none). prev_tokens: the previous step's sampled ids on the device
        (for placeholder inputs)."""
        positions, meta = build_metadata(step, self.block_size, self.device)
        ids = to_device(step.input_ids, self.device)
        if step.fill_at is not None:
            ids[to_device(step.fill_at, self.device)] = prev_tokens[to_device(step.fill_from, self.device)]
        if self.lora is not None:
            self.lora.set_step(step.lora_slots, step.lens)
        if (self.graphs is not None and meta.is_decode_only and self.graphs.fits(meta.num_seqs)
                and step.prompt_logprobs is None and step.lora_slots is None):  # (adapters' steps run eagerly)
            logits = self.graphs.run(meta, ids, positions)  # every rank replays, sampling or not
            return (logits if step.sample_rows else None), None
        self.attention.plan(meta)
        pos = to_device(positions, self.device)
        hidden = self.model(ids, pos, self.attention)
        prompt = None if step.prompt_logprobs is None else self._prompt_logprobs(hidden, step.prompt_logprobs)
        if not step.sample_rows:
            return None, prompt
        index = meta.query_start_loc[1:][to_device(step.sample_rows, self.device, torch.int64)] - 1
        return self.model.compute_logits(hidden[index]), prompt

    def _prompt_logprobs(self, hidden: torch.Tensor, where: PromptLogprobsInput, rows: int = 1024
                         ) -> PromptLogprobs:
        """Each listed token's log-softmax over the vocabulary, read at the next prompt token (and the top
        alternatives), a slice of rows at a time: a long prompt's logits never exist whole."""
        index, targets = to_device(where.index, self.device), to_device(where.targets, self.device)
        chosen, top_ids, top_lps = [], [], []
        for s in range(0, len(index), rows):
            lps = torch.log_softmax(self.model.compute_logits(hidden[index[s : s + rows]]), dim=-1)
            chosen.append(lps.gather(1, targets[s : s + rows, None]).squeeze(1))
            if where.top:
                top = lps.topk(where.top, dim=-1)
                top_ids.append(top.indices)
                top_lps.append(top.values)
        return PromptLogprobs(torch.cat(chosen), torch.cat(top_ids) if top_ids else None,
                              torch.cat(top_lps) if top_lps else None)

    # --- the other ranks of a tensor/expert-parallel worker ---

    @torch.inference_mode()
    def follow(self) -> None:
        """Run the driver's steps until it stops the group (a rank other than 0 lives in this loop)."""
        prev = None
        while (step := self.parallel.broadcast(None)) is not None:
            if step.lora_places:
                self.lora.follow(step.lora_places)
            self._forward(step, prev)  # (its collectives meet rank 0's: prompt logprobs' logits included)
            prev = None
            if step.share_samples:  # rank 0's samples of this step: the next step's placeholder inputs
                prev = torch.empty(len(step.sample_rows), dtype=torch.int64, device=self.device)
                self.parallel.broadcast_tensor(prev)

    def stop_followers(self) -> None:
        if self.parallel.world_size > 1 and self.parallel.is_driver:
            self.parallel.broadcast(None)


def _report_prompt_logprobs(reqs: list[Request], where: PromptLogprobsInput, got: PromptLogprobs) -> None:
    """Append a step's prompt logprobs to their requests (a host sync: only in steps that compute some)."""
    chosen = got.chosen.tolist()
    top_ids = got.top_ids.tolist() if got.top_ids is not None else None
    top_lps = got.top_logprobs.tolist() if got.top_logprobs is not None else None
    at = 0
    for i, n in where.counts:
        r = reqs[i]
        k = r.params.prompt_logprobs
        for j in range(at, at + n):
            top = tuple(zip(top_ids[j][:k], top_lps[j][:k], strict=True)) if k and top_ids is not None else ()
            r.prompt_logprobs.append(TokenLogprob(int(where.targets[j]), chosen[j], top))
        at += n
