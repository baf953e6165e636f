"""A worker's moving parts: the engine on its thread, the KV transport, tokenizer files, the event log."""

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, resolve_device
from engine.sampling_params import SamplingParams
from engine.tokenizer_files import read_tokenizer_files, tokenizer_dir
from kv_transfer.descriptors import PoolDescriptor
from kv_transfer.host_transport import SHM_DIR, HostTransport, shared_pool
from protocol.messages import WireSamplingParams, WorkerInfo, WorkerLoad
from protocol.tokenizer import ChatTokenizer
from worker.config import WorkerConfig
from worker.events import EventLog

log = logging.getLogger("pdserve.worker")


def to_sampling_params(p: WireSamplingParams, **override) -> SamplingParams:
    fields = p.model_dump()
    fields.update(override)
    fields["stop"] = tuple(fields["stop"])
    fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
    return SamplingParams(**fields)


class WorkerRuntime:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.events = EventLog()
        self.kv_bytes_sent = 0
        self.shm_path: Path | None = None
        tok_dir = tokenizer_dir(config.model)
        self.tokenizer_files = read_tokenizer_files(tok_dir)
        tokenizer = ChatTokenizer.from_files(self.tokenizer_files)
        allocator = None
        if config.transport == "host" and config.role == "decode" and resolve_device(config.device).type != "cuda":
            # The decode pool lives in shared memory so that prefill workers on this host can write into it.
            self.shm_path = SHM_DIR / f"pdserve-kv-{config.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            allocator = lambda shape, dtype: shared_pool(self.shm_path, shape, dtype)  # noqa: E731
        engine = LLMEngine(EngineConfig(
            model=config.model, served_model_name=config.served_model_name, device=config.device,
            dtype=config.dtype, block_size=config.block_size, kv_cache_bytes=config.kv_cache_bytes,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            load_format=config.load_format, gpu_memory_utilization=config.gpu_memory_utilization,
            attention_backend=config.attention_backend,
        ), tokenizer=tokenizer, kv_allocator=allocator)
        self.engine = AsyncEngine(engine, after_step=self._drain_events)
        lay = engine.kv_layout
        address = str(self.shm_path) if self.shm_path else ""
        self.descriptor = PoolDescriptor(config.name, config.transport, address, lay.num_blocks, lay.num_layers,
                                         lay.block_size, lay.num_kv_heads, lay.head_dim, lay.dtype)
        if config.transport == "nccl":
            raise NotImplementedError("the nccl transport is not wired into workers yet (kv_transfer.dist_transport)")
        if config.transport == "nixl":  # GPU pools, same host (cuda_ipc) or across hosts (RDMA)
            from kv_transfer.nixl_transport import NixlTransport

            # Only a sender gathers scattered blocks into a staging buffer (128 blocks, split in two halves).
            self.transport = NixlTransport(config.name, staging_blocks=128 if config.role == "prefill" else 0)
        elif engine.device.type == "cuda":  # same host, GPU pools: CUDA IPC
            from kv_transfer.cuda_ipc_transport import CudaIpcTransport

            self.transport = CudaIpcTransport(config.name)
        else:
            self.transport = HostTransport(config.name)
        self.descriptor = self.transport.register_pool(engine.kv_cache.tensor, self.descriptor)
        self.info = WorkerInfo(
            role=config.role, name=config.name, model=engine.config.model_name, block_size=config.block_size,
            root_hash=engine.root_hash, max_model_len=engine.max_model_len,
            tokenizer_hash=hashlib.sha256(json.dumps(self.tokenizer_files, sort_keys=True).encode()).hexdigest(),
        )

    def _drain_events(self, engine: LLMEngine) -> None:
        events = engine.block_pool.drain_events()
        if events:
            self.events.extend(events)

    def load(self) -> WorkerLoad:
        e = self.engine.engine  # read-only counters: a slightly stale view is fine for routing
        return WorkerLoad(running=len(e.scheduler.running) + len(e.scheduler.remote),
                          waiting=len(e.scheduler.waiting), free_blocks=e.block_pool.num_free_blocks,
                          total_blocks=e.block_pool.num_blocks, tokens_computed=e.stats.num_tokens_computed,
                          prompt_tokens_cached=e.kv_manager.num_hit_tokens, prompt_tokens=e.stats.num_prompt_tokens,
                          kv_bytes_sent=self.kv_bytes_sent)

    async def snapshot(self) -> tuple[int, list[int]]:
        """(event seq, every cached block hash), taken together on the engine thread."""
        def take(engine: LLMEngine) -> tuple[int, list[int]]:
            self._drain_events(engine)
            return self.events.seq, list(engine.block_pool.cached)

        return await self.engine.call(take)

    def close(self) -> None:
        self.engine.shutdown()
        self.transport.close()
        if self.shm_path is not None:
            self.shm_path.unlink(missing_ok=True)
