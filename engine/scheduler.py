"""Continuous batching with chunked prefill: which requests run this step, and how many tokens each.

Running requests go first (decodes, then unfinished prefill chunks), within a token budget a step; when
blocks run out, the most recently admitted request is preempted (its blocks freed, recomputed later).
Waiting requests are admitted in order while blocks and budget last (one whose prefix is being read from
disk, or whose LoRA adapter waits for a device slot, is passed over until it can run). The order is
arrival's, unless requests carry priorities or tenants: then lower priority values first; among equals the tenant with the fewest requests running (the slots are
shared out one at a time, so tenants decode at even rates whatever their requests' lengths), then the one that
has been computed the fewest tokens (a tenant arriving idle starts level with the least-served active one),
then arrival: a flood from one key cannot hold back a higher-priority request behind it, and keys of one
priority share the worker evenly.
"""

import heapq
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.kv_cache_manager import LOADING, KVCacheManager, blocks_for
from engine.request import FinishReason, Request, RequestStatus

if TYPE_CHECKING:
    from engine.lora import Adapters


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # the chunked-prefill token budget of one step
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")


@dataclass(slots=True)
class ScheduledBatch:
    requests: list[Request]
    num_new_tokens: list[int]
    preempted: list[Request]

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, adapters: "Adapters | None" = None):
        self.config = config
        self.kv = kv
        self.adapters = adapters  # LoRA adapters' device slots, taken at admission and given back at the end
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.held: dict[str, Request] = {}  # finished prefills whose blocks wait to be sent
        self.remote: dict[str, Request] = {}  # reserved blocks waiting for a prefill worker's KV
        self.ordered = False  # a request came with a priority or a tenant: waiting ones are taken in that order
        self.served: dict[str, int] = {}  # tenant -> tokens computed for its requests
        self.active: dict[str, int] = {}  # tenant -> its requests here (waiting or running)

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self._join(req)
        self.waiting.append(req)

    def _join(self, req: Request) -> None:
        p = req.params
        if p.priority or p.tenant or self.ordered:
            self.ordered = True
            if p.tenant not in self.active:  # arriving idle: level with the least-served tenant active now
                floor = min((self.served.get(t, 0) for t in self.active), default=0)
                self.served[p.tenant] = max(self.served.get(p.tenant, 0), floor)
            self.active[p.tenant] = self.active.get(p.tenant, 0) + 1
        req.counted = self.ordered

    def _leave(self, req: Request) -> None:
        tenant = req.params.tenant
        left = self.active.get(tenant, 0) - 1
        if left > 0:
            self.active[tenant] = left
        else:
            self.active.pop(tenant, None)

    def fits_pool(self, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.kv.block_size) <= self.kv.pool.num_blocks

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        batch = ScheduledBatch([], [], [])
        if self.ordered:
            # Worst priority last (then latest): what runs out of blocks preempts from the end, as _make_room.
            self.running.sort(key=lambda r: (r.params.priority, r.arrival_index))
            if self.waiting and len(self.running) == self.config.max_num_seqs:
                self._make_room(batch)
        made_room = len(batch.preempted)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._at_limit(req):  # its last token (still being computed) ends it: nothing more to run
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.grow(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            break
        if self.ordered:
            self._account(batch)
        if len(batch.preempted) > made_room:  # the blocks ran out: nothing more is admitted this step
            return batch
        if self.ordered:
            self._admit_ordered(batch, budget)
            return batch
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[i]
            if not self._slot_for(req):  # every adapter slot is held: the next ones may go first
                i += 1
                continue
            n = self.kv.admit(req, budget)
            if n is None:
                self._drop_slot(req)
                break
            if n == LOADING:  # its prefix is coming back from disk: the next ones may go first
                self._drop_slot(req)
                i += 1
                continue
            del self.waiting[i]
            self._run(req, n, batch)
            budget -= n
        return batch

    def _make_room(self, batch: ScheduledBatch) -> None:
        """Every slot taken and a waiting request of a better priority than a running one: the running one of the
        worst priority (the latest of them) is preempted, so the better one waits one step, not for it to end."""
        victim = self.running[-1]
        better = heapq.nsmallest(8, (r for r in self.waiting if r.params.priority < victim.params.priority),
                                 key=lambda r: (r.params.priority, r.arrival_index))
        if any(not self.kv.loading(r) for r in better):  # (one whose prefix is still on disk cannot run yet)
            self.running.pop()
            self._preempt(victim)
            batch.preempted.append(victim)

    def _run(self, req: Request, n: int, batch: ScheduledBatch) -> None:
        if req.queued_s is None:
            req.queued_s = time.monotonic() - req.arrival_time
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        batch.requests.append(req)
        batch.num_new_tokens.append(n)

    def _account(self, batch: ScheduledBatch) -> None:
        """Each tenant's tokens computed by the running requests of the batch."""
        served = self.served
        for req, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            served[req.params.tenant] = served.get(req.params.tenant, 0) + n

    def _admit_ordered(self, batch: ScheduledBatch, budget: int) -> None:
        """Admit waiting requests by priority, then their tenant's requests running, then its tokens computed
        so far (both counted as each is admitted), then arrival: each (priority, tenant) queue is taken in its
        own arrival order."""
        if len(self.running) >= self.config.max_num_seqs:
            return
        queues: dict[tuple[int, str], deque[Request]] = {}
        preempted = {r.request_id for r in batch.preempted}  # (made room: not taken back at once)
        for req in self.waiting:  # (arrival order, the preempted first)
            if req.request_id not in preempted:
                queues.setdefault((req.params.priority, req.params.tenant), deque()).append(req)
        running: dict[str, int] = {}
        for req in self.running:
            running[req.params.tenant] = running.get(req.params.tenant, 0) + 1
        served, admitted = self.served, set()
        while queues and budget > 0 and len(self.running) < self.config.max_num_seqs:
            head = min(queues, key=lambda k: (k[0], running.get(k[1], 0), served.get(k[1], 0),
                                              queues[k][0].arrival_index))
            queue = queues[head]
            req = queue[0]
            n = self.kv.admit(req, budget) if self._slot_for(req) else LOADING
            if n is None:
                self._drop_slot(req)
                break
            queue.popleft()
            if not queue:
                del queues[head]
            if n == LOADING:  # its prefix is coming back from disk, or no adapter slot: the next ones may go first
                self._drop_slot(req)
                continue
            admitted.add(req.request_id)
            self._run(req, n, batch)
            running[head[1]] = running.get(head[1], 0) + 1
            served[head[1]] = served.get(head[1], 0) + n
            budget -= n
        if admitted:
            self.waiting = deque(r for r in self.waiting if r.request_id not in admitted)

    def _slot_for(self, req: Request) -> bool:
        """Its adapter is in a device slot (taken now if it was not), or it has none; False while every slot
        is held by other adapters' admitted requests."""
        if req.adapter is None or req.lora_slot >= 0:
            return True
        slot = self.adapters.acquire(req.adapter)
        if slot is None:
            return False
        req.lora_slot = slot
        return True

    def _drop_slot(self, req: Request) -> None:
        if req.lora_slot >= 0:
            self.adapters.release(req.lora_slot)
            req.lora_slot = -1

    def _at_limit(self, req: Request) -> bool:
        return len(req.output_token_ids) >= req.params.max_tokens or req.num_tokens >= self.config.max_model_len

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self._drop_slot(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: FinishReason, free_later: list[Request] | None = None) -> None:
        """End a request (done, aborted or failed): its blocks go back to the pool at once, or, with
        free_later, the request joins that list and its caller frees them (kv.free) when it is safe."""
        if req.is_finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.request_id in self.remote:
            del self.remote[req.request_id]
        else:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self._drop_slot(req)
        del self.requests[req.request_id]
        if req.counted:
            self._leave(req)
        if req.hold_kv and reason is not FinishReason.ABORT:
            self.held[req.request_id] = req
        elif free_later is not None:
            free_later.append(req)
        else:
            self.kv.free(req)

    def release_held(self, request_id: str) -> None:
        req = self.held.pop(request_id, None)
        if req is not None:
            self.kv.free(req)

    def add_remote(self, req: Request) -> bool:
        """Reserve a whole prompt's blocks (and its adapter's slot) for KV arriving from a prefill worker."""
        if not self._slot_for(req):
            return False
        if not self.kv.reserve(req):
            self._drop_slot(req)
            return False
        self._join(req)
        self.requests[req.request_id] = req
        self.remote[req.request_id] = req
        return True

    def start_remote(self, req: Request) -> None:
        """The prompt's KV has arrived: the request joins the running batch for decoding."""
        del self.remote[req.request_id]
        req.num_computed_tokens = req.num_tokens
        self.kv.commit(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
