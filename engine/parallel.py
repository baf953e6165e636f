"""Tensor and expert parallelism: which rank holds which heads, vocab rows and experts, and the collectives
the model calls. A worker of tp_size x ep_size ranks: rank r has tp_rank r % tp_size and ep_rank
r // tp_size. Attention and dense MLPs are split over the tp_size ranks sharing an ep_rank (and repeated
across ep_ranks); MoE experts are split over ep_ranks, each expert's intermediate dimension over tp_ranks.
Every rank sees the same batch: rank 0 schedules and broadcasts it on a CPU (gloo) control group.

With one rank every collective is a no-op, so the model code is the same for both.
"""

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    tp_size: int = 1
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.ep_size < 1:
            raise ValueError(f"tp_size and ep_size must be >= 1, got {self.tp_size}, {self.ep_size}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.ep_size


@dataclass(frozen=True, slots=True)
class HeadShard:
    """The attention heads one rank computes: query heads [q_start, q_start + num_heads) and KV heads
    [kv_start, kv_start + num_kv_heads) of the model's; KV heads repeat on several ranks when there are
    fewer of them than ranks."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


class Parallel:
    def __init__(self, config: ParallelConfig = ParallelConfig(), rank: int = 0, tp_group: Any = None,
                 ep_group: Any = None, control_group: Any = None):
        self.config = config
        self.rank = rank
        self.tp_size, self.ep_size = config.tp_size, config.ep_size
        self.world_size = config.world_size
        self.tp_rank, self.ep_rank = rank % config.tp_size, rank // config.tp_size
        self.tp_group, self.ep_group, self.control_group = tp_group, ep_group, control_group

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # --- what this rank holds ---

    def heads(self, num_heads: int, num_kv_heads: int) -> HeadShard:
        tp = self.tp_size
        if num_heads % tp:
            raise ModelLoadError(f"{num_heads} attention heads do not split over tp_size {tp}")
        if (num_kv_heads % tp) if num_kv_heads >= tp else (tp % num_kv_heads):
            raise ModelLoadError(f"{num_kv_heads} KV heads neither split over nor divide tp_size {tp}")
        q = num_heads // tp
        kv = max(num_kv_heads // tp, 1)
        return HeadShard(self.tp_rank * q, q, self.tp_rank * num_kv_heads // tp, kv)

    def split(self, size: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's even share of a dimension split over tp ranks."""
        if size % self.tp_size:
            raise ModelLoadError(f"{what} of {size} does not split over tp_size {self.tp_size}")
        n = size // self.tp_size
        return self.tp_rank * n, n

    def vocab_rows(self, vocab_size: int) -> tuple[int, int]:
        """(start, rows) of the vocabulary this rank embeds and scores; the last shard is zero-padded."""
        rows = -(-vocab_size // self.tp_size)
        return self.tp_rank * rows, rows

    def experts(self, num_experts: int) -> tuple[int, int]:
        """(first, count) of the experts this rank's ep_rank holds."""
        if num_experts % self.ep_size:
            raise ModelLoadError(f"{num_experts} experts do not split over ep_size {self.ep_size}")
        n = num_experts // self.ep_size
        return self.ep_rank * n, n

    # --- collectives (no-ops on one rank) ---

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def tp_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every tp rank's x along the last dimension."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def ep_all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every ep rank's x (same shape on all) along the first dimension."""
        parts = [torch.empty_like(x) for _ in range(self.ep_size)]
        dist.all_gather(parts, x.contiguous(), group=self.ep_group)
        return torch.cat(parts)

    def ep_all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows of x go to ep ranks in order, send_counts[i] rows to rank i; recv_counts[i] come from rank i."""
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.ep_group)
        return out

    def broadcast_tensor(self, t: torch.Tensor) -> None:
        """Rank 0's t into every rank's t (in place, on the device: queued, not waited for)."""
        dist.broadcast(t, src=0)

    def broadcast(self, obj: Any) -> Any:
        """The driver's obj on every rank (pickled over the CPU control group)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t.item())


SINGLE = Parallel()


def init_parallel(config: ParallelConfig, rank: int, init_method: str, device: torch.device,
                  timeout_s: float = 120.0) -> Parallel:
    """Join the worker's process group (NCCL on CUDA, gloo on CPU) and build the tp, ep and control groups.
    timeout_s bounds one collective inside a step (a rank that stops answering fails the step).

    Every rank calls this with the same arguments but its rank; groups are created in the same order on all.
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=config.world_size,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    tp, ep = config.tp_size, config.ep_size
    tp_group = ep_group = None
    for e in range(ep):
        g = dist.new_group([e * tp + t for t in range(tp)], timeout=timeout)
        if rank // tp == e:
            tp_group = g
    for t in range(tp):
        g = dist.new_group([e * tp + t for e in range(ep)], timeout=timeout)
        if rank % tp == t:
            ep_group = g
    # The other ranks wait on the control group for rank 0's next step for as long as the worker is idle:
    # no timeout there (a dead rank 0 still ends the wait at once: its connections close).
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))
    return Parallel(config, rank, tp_group, ep_group, control)
