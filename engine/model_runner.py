"""Runs one scheduled step: packs the batch, plans attention once, runs the model, samples.

The step's metadata is built on the host with numpy and copied to the device once; the only host sync
is reading the sampled tokens back, in the engine.
"""

import numpy as np
import torch

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import BatchMetadata
from engine.model import CausalLM
from engine.request import Request
from engine.sampler import SamplerOutput, SamplingBatch, sample
from engine.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: CausalLM, attention: AttentionBackend, block_size: int, device: torch.device):
        self.model = model
        self.attention = attention
        self.block_size = block_size
        self.device = device
        self.vocab_size = model.config.vocab_size

    def _metadata(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, BatchMetadata, list[int]]:
        bs = self.block_size
        reqs, counts = batch.requests, batch.num_new_tokens
        starts = np.array([r.num_computed_tokens for r in reqs], dtype=np.int64)
        lens = np.array(counts, dtype=np.int64)
        seq_lens = starts + lens
        query_start = np.zeros(len(reqs) + 1, dtype=np.int64)
        np.cumsum(lens, out=query_start[1:])
        # [num_tokens]: positions of the new tokens, request after request.
        positions = np.arange(int(query_start[-1]), dtype=np.int64) - np.repeat(query_start[:-1] - starts, lens)
        input_ids = np.concatenate([r.all_token_ids[s : s + n] for r, s, n in zip(reqs, starts, lens, strict=True)])
        max_blocks = max(len(r.block_ids) for r in reqs)
        tables = np.zeros((len(reqs), max_blocks), dtype=np.int64)
        for row, r in enumerate(reqs):
            tables[row, : len(r.block_ids)] = r.block_ids
        seq_of_token = np.repeat(np.arange(len(reqs)), lens)
        slot_blocks = tables[seq_of_token, positions // bs]
        # Logits only where a request's last known token is computed this step (not mid-prefill chunks).
        sample_rows = [i for i, r in enumerate(reqs) if seq_lens[i] == r.num_tokens]
        logits_index = query_start[1:][sample_rows] - 1

        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(self.device, non_blocking=True)

        meta = BatchMetadata(
            query_start_loc=dev(query_start), seq_lens=dev(seq_lens), block_tables=dev(tables),
            slot_blocks=dev(slot_blocks), slot_offsets=dev(positions % bs),
            max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()), is_decode_only=bool((lens == 1).all()),
        )
        self._logits_index = dev(logits_index)
        return dev(input_ids), dev(positions), meta, sample_rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Request], SamplerOutput | None]:
        input_ids, positions, meta, sample_rows = self._metadata(batch)
        self.attention.plan(meta)
        hidden = self.model(input_ids, positions, self.attention)
        if not sample_rows:
            return [], None
        reqs = [batch.requests[i] for i in sample_rows]
        logits = self.model.compute_logits(hidden[self._logits_index])
        return reqs, sample(logits, SamplingBatch.build(reqs, self.vocab_size, self.device))
