"""A worker's moving parts: the engine on its thread, the KV transport, tokenizer files, the event log."""

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable

from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine
from engine.parallel import SINGLE, Parallel
from engine.sampling_params import SamplingParams
from engine.tokenizer_files import read_tokenizer_files, tokenizer_dir
from kv_transfer.descriptors import HeadSlice, PoolDescriptor, TransferError, shard_plan
from protocol.messages import WireSamplingParams, WorkerInfo, WorkerLoad
from protocol.tokenizer import ChatTokenizer
from worker.config import WorkerConfig
from worker.events import EventLog
from worker.shard import EngineShard

log = logging.getLogger("pdserve.worker")
# Another rank's EngineShard.send, from rank 0: (targets, src block ids, dst block ids, timeout_s) -> bytes
RankSender = Callable[[list[tuple[PoolDescriptor, HeadSlice | None]], list[int], list[int], float], Awaitable[int]]


def to_sampling_params(p: WireSamplingParams, **override) -> SamplingParams:
    fields = p.model_dump()
    fields.update(override)
    fields["stop"] = tuple(fields["stop"])
    fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
    return SamplingParams(**fields)


class WorkerRuntime:
    """Rank 0 of a worker (the only rank of a single-rank one): the engine thread, events, the HTTP-facing
    state, and the other ranks' KV senders when it is tensor/expert parallel."""

    def __init__(self, config: WorkerConfig, parallel: Parallel = SINGLE):
        self.config = config
        self.events = EventLog()
        self.kv_bytes_sent = 0
        tok_dir = tokenizer_dir(config.model)
        self.tokenizer_files = read_tokenizer_files(tok_dir)
        tokenizer = ChatTokenizer.from_files(self.tokenizer_files)
        self.shard = EngineShard(config, parallel, tokenizer)
        engine = self.shard.engine
        self.engine = AsyncEngine(engine, after_step=self._drain_events)
        self.descriptor = self.shard.descriptor
        self.descriptors = [self.descriptor]  # every rank's pool, in rank order (attach_ranks adds the others)
        self.rank_senders: list[RankSender] = []
        self.info = WorkerInfo(
            role=config.role, name=config.name, model=engine.config.model_name, block_size=config.block_size,
            root_hash=engine.root_hash, max_model_len=engine.max_model_len,
            tokenizer_hash=hashlib.sha256(json.dumps(self.tokenizer_files, sort_keys=True).encode()).hexdigest(),
        )

    def attach_ranks(self, descriptors: list[PoolDescriptor], senders: list["RankSender"]) -> None:
        """The pools and KV senders of ranks 1.. of a tensor/expert-parallel worker."""
        self.descriptors = [self.descriptor, *descriptors]
        self.rank_senders = list(senders)

    async def send_kv(self, dests: list[PoolDescriptor], src_block_ids: list[int], dst_block_ids: list[int],
                      timeout_s: float) -> int:
        """Write a request's KV blocks into a decode worker's pools (one a rank): each of this worker's ranks
        sends the heads it holds, concurrently. Returns the bytes written; raises TransferError."""
        plan = shard_plan(self.descriptors, dests)
        jobs = [asyncio.to_thread(self.shard.send, plan[0], src_block_ids, dst_block_ids, timeout_s)] if plan[0] else []
        jobs += [send(targets, src_block_ids, dst_block_ids, timeout_s)
                 for send, targets in zip(self.rank_senders, plan[1:], strict=True) if targets]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0] if isinstance(errors[0], TransferError) else TransferError(str(errors[0]))
        return sum(results)

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
                          kv_bytes_sent=self.kv_bytes_sent, steps=e.stats.num_steps)

    async def snapshot(self) -> tuple[int, list[int]]:
        """(event seq, every cached block hash), taken together on the engine thread."""
        def take(engine: LLMEngine) -> tuple[int, list[int]]:
            self._drain_events(engine)
            return self.events.seq, list(engine.block_pool.cached)

        return await self.engine.call(take)

    def close(self) -> None:
        self.engine.shutdown()
        if self.engine.error is None:
            self.shard.engine.runner.stop_followers()
        self.shard.close()
