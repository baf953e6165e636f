"""Runs one scheduled step: packs the batch, plans attention once, runs the model, samples.

The step's metadata is built on the host with numpy and copied to the device once; decode-only steps on
CUDA replay a captured graph. The only host sync is reading the sampled tokens back, in the engine.
"""

import numpy as np
import torch

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import BatchMetadata
from engine.model import CausalLM
from engine.request import Request
from engine.sampler import SamplerOutput, SamplingBatch, sample
from engine.scheduler import ScheduledBatch


def build_metadata(reqs: list[Request], counts: list[int], block_size: int, device: torch.device,
                   ) -> tuple[np.ndarray, np.ndarray, BatchMetadata, list[int]]:
    """Host arrays (input ids, positions), the device metadata, and the rows that sample this step."""
    bs = block_size
    starts = np.array([r.num_computed_tokens for r in reqs], dtype=np.int64)
    lens = np.array(counts, dtype=np.int64)
    seq_lens = starts + lens
    query_start = np.zeros(len(reqs) + 1, dtype=np.int64)
    np.cumsum(lens, out=query_start[1:])
    # [num_tokens]: positions of the new tokens, request after request.
    positions = np.arange(int(query_start[-1]), dtype=np.int64) - np.repeat(query_start[:-1] - starts, lens)
    input_ids = np.concatenate([r.token_slice(s, s + n) for r, s, n in zip(reqs, starts.tolist(), lens.tolist(),
                                                                            strict=True)])
    num_blocks = -(-seq_lens // bs)
    kv_indptr = np.zeros(len(reqs) + 1, dtype=np.int32)
    np.cumsum(num_blocks, out=kv_indptr[1:])
    kv_indices = np.concatenate([r.block_ids[:n] for r, n in zip(reqs, num_blocks, strict=True)]).astype(np.int64)
    tables = np.zeros((len(reqs), int(num_blocks.max())), dtype=np.int64)
    rows = np.repeat(np.arange(len(reqs)), num_blocks)
    tables[rows, np.arange(len(kv_indices)) - np.repeat(kv_indptr[:-1], num_blocks)] = kv_indices
    slot_blocks = tables[np.repeat(np.arange(len(reqs)), lens), positions // bs]
    # Logits only where a request's last known token is computed this step (not mid-prefill chunks).
    sample_rows = [i for i, r in enumerate(reqs) if seq_lens[i] == r.num_tokens]

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device, non_blocking=True)

    meta = BatchMetadata(
        query_start_loc=dev(query_start), seq_lens=dev(seq_lens), block_tables=dev(tables),
        slot_blocks=dev(slot_blocks), slot_offsets=dev(positions % bs),
        max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()), is_decode_only=bool((lens == 1).all()),
        kv_indptr_host=torch.from_numpy(kv_indptr), kv_indices=dev(kv_indices.astype(np.int32)),
        kv_last_page_len_host=torch.from_numpy(((seq_lens - 1) % bs + 1).astype(np.int32)),
        query_start_loc_host=torch.from_numpy(query_start.astype(np.int32)),
    )
    return input_ids, positions, meta, sample_rows


class ModelRunner:
    def __init__(self, model: CausalLM, attention: AttentionBackend, block_size: int, device: torch.device,
                 graphs: "object | None" = None):
        self.model = model
        self.attention = attention
        self.block_size = block_size
        self.device = device
        self.vocab_size = model.config.vocab_size
        self.graphs = graphs  # a CudaGraphDecoder when decode steps replay captured graphs

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Request], SamplerOutput | None]:
        input_ids, positions, meta, sample_rows = build_metadata(batch.requests, batch.num_new_tokens,
                                                                 self.block_size, self.device)
        if self.graphs is not None and meta.is_decode_only and self.graphs.fits(len(batch.requests)):
            logits = self.graphs.run(meta, input_ids, positions)
        else:
            self.attention.plan(meta)
            ids = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
            pos = torch.from_numpy(positions).to(self.device, non_blocking=True)
            hidden = self.model(ids, pos, self.attention)
            if not sample_rows:
                return [], None
            index = meta.query_start_loc[1:][torch.tensor(sample_rows, device=self.device)] - 1
            logits = self.model.compute_logits(hidden[index])
        if not sample_rows:
            return [], None
        reqs = [batch.requests[i] for i in sample_rows]
        if all(r.params.plain_greedy for r in reqs):  # no sampling state to build: argmax on the device
            return reqs, SamplerOutput(logits.argmax(dim=-1), None, None, None)
        return reqs, sample(logits, SamplingBatch.build(reqs, self.vocab_size, self.device))
