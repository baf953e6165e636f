"""One rank's share of a worker: its engine (its slice of the model and of the KV pool) and the KV
transport that moves its pool's blocks. A single-rank worker is one shard; a tensor/expert-parallel
worker has one a rank, rank 0's driving the schedule (worker/engine_core.py), the others following."""

import dataclasses
import logging
import os
import uuid
from pathlib import Path

import torch

from engine.block_pool import BlockPool
from engine.errors import ModelLoadError, RequestError
from engine.llm_engine import LLMEngine, resolve_device
from engine.parallel import SINGLE, Parallel
from kv_transfer.descriptors import HeadSlice, PoolDescriptor
from kv_transfer.host_transport import SHM_DIR, HostTransport, shared_pool
from protocol.tokenizer import ChatTokenizer
from worker.config import WorkerConfig

# What a worker chose at start (attention backend, KV transport) is logged whatever the log level.
startup_log = logging.getLogger("pdserve.worker.startup")
startup_log.setLevel(logging.INFO)


class EngineShard:
    def __init__(self, config: WorkerConfig, parallel: Parallel = SINGLE, tokenizer: ChatTokenizer | None = None):
        self.config = config
        self.parallel = parallel
        self.shm_path: Path | None = None
        allocator = None
        if config.transport == "host" and config.role == "decode" and resolve_device(config.engine.device).type != "cuda":
            # The decode pool lives in shared memory so that prefill workers on this host can write into it.
            self.shm_path = SHM_DIR / f"pdserve-kv-{config.name}-r{parallel.rank}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            allocator = lambda shape, dtype: shared_pool(self.shm_path, shape, dtype)  # noqa: E731
        # Text and stop strings are the frontend process's work (worker/frontend.py), never the engine loop's.
        self.engine = LLMEngine(dataclasses.replace(config.engine, detokenize=False), tokenizer=tokenizer,
                                kv_allocator=allocator, parallel=parallel)
        for name, path in config.loras:
            try:
                self.engine.load_adapter(name, path)
            except RequestError as e:
                raise ModelLoadError(f"--lora {name}={path}: {e}") from e
        lay, heads = self.engine.kv_layout, self.engine.model.heads
        agent = config.name if parallel.world_size == 1 else f"{config.name}.rank{parallel.rank}"
        descriptor = PoolDescriptor(agent, config.transport, str(self.shm_path or ""), lay.num_blocks, lay.num_layers,
                                    lay.block_size, lay.num_kv_heads, lay.head_dim, lay.dtype,
                                    kv_head_start=heads.kv_start,
                                    total_kv_heads=self.engine.model_config.num_kv_heads)
        if config.transport == "nixl":  # GPU pools, same host (cuda_ipc) or across hosts (RDMA)
            from kv_transfer.nixl_transport import NixlTransport

            # Only a sender gathers scattered blocks into a staging buffer (two halves of a receiver's
            # run alignment: an aligned run then takes one descriptor a half).
            staging = 2 * BlockPool.RUN_ALIGN if config.role == "prefill" else 0
            self.transport = NixlTransport(agent, staging_blocks=staging)
        elif self.engine.device.type == "cuda":  # same host, GPU pools: CUDA IPC
            from kv_transfer.cuda_ipc_transport import CudaIpcTransport

            self.transport = CudaIpcTransport(agent)
        else:
            self.transport = HostTransport(agent)
        self.descriptor = self.transport.register_pool(self.engine.kv_cache.tensor, descriptor)
        startup_log.info("%s: KV transport %s, attention backend %s on %s", agent, type(self.transport).__name__,
                         type(self.engine.attention).__name__, self.engine.device)

    def send(self, targets: list[tuple[PoolDescriptor, HeadSlice | None]], src_block_ids: list[int],
             dst_block_ids: list[int], timeout_s: float) -> int:
        """Write this rank's part of a request's KV into each target pool; returns the bytes written."""
        if self.engine.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # a following rank's last step may still be running
        lay = self.engine.kv_layout
        sent = 0
        for dest, heads in targets:
            self.transport.connect(dest)
            self.transport.write_blocks(dest.agent, src_block_ids, dst_block_ids, timeout_s, heads)
            share = lay.num_kv_heads if heads is None else heads.count
            sent += len(src_block_ids) * lay.block_bytes * share // lay.num_kv_heads
        return sent

    def close(self) -> None:
        self.transport.close()
        tier = self.engine.host_tier
        if tier is not None and tier.below is not None:
            tier.below.close()  # what is queued for the disk tier is written (a restart reuses it)
        if self.shm_path is not None:
            self.shm_path.unlink(missing_ok=True)
