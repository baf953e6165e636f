"""Decode steps as captured CUDA graphs, one per batch size, over static input buffers.

A batch is padded to the next captured size; padded rows attend to one token of the KV cache's scratch
block and write their KV there. FlashInfer's decode plan runs on the host before each replay, filling the
graph's fixed index buffers. Before capturing, batch 1's linears are tuned (engine/gemv.py); a single-rank
engine captures each size once with cuBLAS and once with cuBLASLt and keeps the faster replay.
"""

import logging

import numpy as np
import torch

from engine import gemv
from engine.attention.flashinfer_backend import FlashInferAttention
from engine.attention.metadata import BatchMetadata
from engine.device import pinned, to_device
from engine.model import CausalLM

log = logging.getLogger("pdserve.engine")


# The BLAS libraries a single-rank engine captures each batch size's graph with, keeping the faster.
BLAS_LIBRARIES: tuple[str | None, ...] = ("cublas", "cublaslt")


def replay_seconds(graph: torch.cuda.CUDAGraph, reps: int = 10) -> float:
    """GPU seconds a replay, back to back, best of reps."""
    graph.replay()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch] + list(range(16, max_batch + 1, 16))
    return sizes if sizes[-1] == max_batch else [*sizes, max_batch]


class CudaGraphDecoder:
    def __init__(self, model: CausalLM, attention: FlashInferAttention, max_batch: int, max_blocks_per_seq: int):
        self.model = model
        self.attention = attention
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        device = attention.kv_cache.tensor.device
        self.scratch = attention.kv_cache.scratch_block
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_blocks = torch.full((n,), self.scratch, dtype=torch.int64, device=device)
        self.slot_offsets = torch.zeros(n, dtype=torch.int64, device=device)
        self.indptr = torch.zeros(n + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(n * max_blocks_per_seq, dtype=torch.int32, device=device)
        self.last_page_len = torch.zeros(n, dtype=torch.int32, device=device)
        self.logits = torch.zeros(n, model.config.vocab_size, dtype=torch.float32, device=device)
        self.wrappers: dict[int, object] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.gemv_report: dict[int, dict[str, dict]] = {}
        self.blas: dict[int, str] = {}  # the BLAS library each size's graph was captured with
        self.blas_ms: dict[int, dict[str, float]] = {}  # {size: {library: replay ms}}, when timed
        self._capture_all()

    def fits(self, batch: int) -> bool:
        return batch <= self.max_batch

    def _dummy_meta(self, bs: int) -> BatchMetadata:
        ones = np.ones(bs, dtype=np.int32)
        return BatchMetadata(
            query_start_loc=self.indptr[: bs + 1].long(), seq_lens=self.slot_offsets[:bs] + 1,
            block_tables=self.slot_blocks[:bs, None], slot_blocks=self.slot_blocks[:bs],
            slot_offsets=self.slot_offsets[:bs], max_query_len=1, max_seq_len=1, is_decode_only=True,
            kv_indptr_host=torch.arange(bs + 1, dtype=torch.int32),
            kv_indices=torch.full((bs,), self.scratch, dtype=torch.int32, device=self.indices.device),
            kv_last_page_len_host=torch.from_numpy(ones), query_start_loc_host=torch.arange(bs + 1, dtype=torch.int32),
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        fi = self.attention.flashinfer
        pool = torch.cuda.graph_pool_handle()
        # Triton linears with the norm / activation fused in, or the unfused ops: timed a batch size at a time
        self.gemv_report = gemv.tune(self.model, self.sizes)
        # A single-rank engine captures each size with each BLAS library and keeps the faster replay (cuBLASLt's
        # heuristics pick other kernels for the skinny matmuls of some batch sizes); ranks of a tensor- or
        # expert-parallel engine capture with the default, so that they all replay the same collectives.
        libraries = BLAS_LIBRARIES if self.model.par.world_size == 1 else (None,)
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
                self.attention.workspace, "NHD", use_cuda_graph=True,
                use_tensor_cores=self.attention.use_tensor_cores,
                paged_kv_indptr_buffer=self.indptr[: bs + 1], paged_kv_indices_buffer=self.indices,
                paged_kv_last_page_len_buffer=self.last_page_len[:bs])
            self.attention.plan(self._dummy_meta(bs), wrapper)
            best = None
            for library in libraries:
                graph = self._capture(bs, pool, library)
                seconds = replay_seconds(graph) if len(libraries) > 1 else 0.0
                self.blas_ms.setdefault(bs, {})[library or "default"] = seconds * 1e3
                if best is None or seconds < best[0]:
                    best = (seconds, graph, library)
                del graph
            self.wrappers[bs], self.graphs[bs], self.blas[bs] = wrapper, best[1], best[2] or "default"
        log.info("captured CUDA graphs for decode batch sizes %s (BLAS library a size: %s)", self.sizes, self.blas)

    def _capture(self, bs: int, pool, library: str | None) -> torch.cuda.CUDAGraph:
        before = torch.backends.cuda.preferred_blas_library()
        if library is not None:
            torch.backends.cuda.preferred_blas_library(library)
        try:
            for _ in range(2):  # warm up outside the graph (kernel selection, allocations)
                self._forward(bs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(bs)
            return graph
        finally:
            torch.backends.cuda.preferred_blas_library(before)

    def _forward(self, bs: int) -> None:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.attention)
        self.logits[:bs] = self.model.compute_logits(hidden)

    def run(self, meta: BatchMetadata, input_ids: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """input_ids: on the device already (the step's placeholders filled there)."""
        n = len(input_ids)
        bs = next(s for s in self.sizes if s >= n)
        pad = bs - n
        # Padded rows: one token at offset 0 of the scratch block.
        indptr, indices, last = meta.kv_indptr_host, meta.kv_indices, meta.kv_last_page_len_host
        device = indices.device
        if pad:
            indptr = pinned(torch.cat([indptr, indptr[-1] + torch.arange(1, pad + 1, dtype=torch.int32)]), device)
            indices = torch.cat([indices, torch.full((pad,), self.scratch, dtype=torch.int32, device=device)])
            last = pinned(torch.cat([last, torch.ones(pad, dtype=torch.int32)]), device)
        padded = BatchMetadata(meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.slot_blocks,
                               meta.slot_offsets, 1, meta.max_seq_len, True, indptr, indices, last, None)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(to_device(positions, device))
        self.slot_blocks[:n].copy_(meta.slot_blocks)
        self.slot_offsets[:n].copy_(meta.slot_offsets)
        if pad:
            self.input_ids[n:bs].zero_()
            self.positions[n:bs].zero_()
            self.slot_blocks[n:bs].fill_(self.scratch)
            self.slot_offsets[n:bs].zero_()
        self.attention.plan(padded, self.wrappers[bs])
        self.graphs[bs].replay()
        return self.logits[:n]
