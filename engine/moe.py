"""Sparse mixture-of-experts block (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks top-k experts a token,
the experts run as one grouped matmul over tokens sorted by expert, and with expert parallelism the tokens
travel to the ranks holding their experts and back by all-to-all.

Every rank holds the whole batch. With ep_size > 1 each ep rank routes its share of the tokens: it sends
each (token, expert) pair to the rank holding the expert, computes what it receives, sends the results
back, weighs and sums them per token, and the shares are gathered again. Outputs are partial sums over
tp ranks (each holds a slice of every local expert's intermediate dimension); the layer all-reduces them.
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import MLP
from engine.model_config import ModelConfig
from engine.parallel import Parallel

# (token, choice) pairs of one rank up to which expert parallelism exchanges fixed-size buffers (no host sync,
# CUDA-graph friendly; decode batches), above which it exchanges exact sizes (prefill: less traffic).
FIXED_EXCHANGE_ROWS = 4096


def grouped_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over rows grouped by expert: x [N, H] with counts[e] rows of expert e in order,
    w13 [E, 2I, H] (gate; up), w2 [E, H, I] -> [N, H]. One grouped matmul each way, no loop over experts."""
    if x.shape[0] == 0:
        return x.new_empty(0, w2.shape[1])
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)  # [N, 2I]
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm((F.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offs)


def looped_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The same as grouped_swiglu, one matmul pair an expert: the reference, and the fallback where a build
    of torch lacks a grouped matmul for the dtype."""
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        gate, up = F.linear(x[start : start + n], w13[e]).chunk(2, dim=-1)
        out.append(F.linear(F.silu(gate) * up, w2[e]))
        start += n
    return torch.cat(out) if out else x.new_empty(0, w2.shape[1])


def _counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """[n] how many of ids are each of 0..n-1. Not bincount: its output size needs a host sync, which a CUDA
    graph cannot hold."""
    return ids.new_zeros(n).index_add_(0, ids, torch.ones_like(ids))


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, par: Parallel):
        super().__init__()
        self.par = par
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.first_expert, self.num_local_experts = par.experts(cfg.num_experts)
        self.intermediate = par.split(cfg.moe_intermediate_size, "moe_intermediate_size")[1]
        self.expert_kernel = grouped_swiglu if hasattr(torch, "_grouped_mm") else looped_swiglu
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router, on every rank
        self.w13 = nn.Parameter(torch.empty(self.num_local_experts, 2 * self.intermediate, cfg.hidden_size))
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, cfg.hidden_size, self.intermediate))
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            # Qwen2-MoE's expert that every token goes through, scaled by a sigmoid gate.
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, par)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> this rank's partial sum of the block's output [T, H] (summed over tp ranks after)."""
        # Routing as transformers does it: softmax in float32, top-k, optional renormalisation.
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        if self.par.ep_size == 1:
            out = self._combine(self._experts(x.repeat_interleave(self.top_k, 0), experts.flatten()), weights)
        else:
            out = self._expert_parallel(x, experts, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def _experts(self, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """rows [N, H], each for global expert expert_ids[n] held here -> expert outputs [N, H], same order.
        Padding rows (id -1, zeros) go through the first local expert: static shapes, outputs nobody reads."""
        local = torch.where(expert_ids >= 0, expert_ids - self.first_expert, 0)
        order = torch.argsort(local, stable=True)
        counts = _counts(local, self.num_local_experts)
        out = torch.empty_like(rows)
        out[order] = self.expert_kernel(rows[order], self.w13, self.w2, counts)
        return out

    def _combine(self, expert_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[T*k, H] outputs in (token, choice) order, weights [T, k] -> [T, H] (a fixed-order sum, no atomics)."""
        t, k = weights.shape
        return (expert_out.view(t, k, expert_out.shape[-1]) * weights.unsqueeze(-1)).sum(dim=1)

    def _expert_parallel(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        par, k = self.par, self.top_k
        num_tokens = x.shape[0]
        share = -(-num_tokens // par.ep_size)
        lo, hi = min(par.ep_rank * share, num_tokens), min((par.ep_rank + 1) * share, num_tokens)
        mine = experts[lo:hi].flatten()  # [n*k] global expert ids of this rank's (token, choice) pairs
        rows = x[lo:hi].repeat_interleave(k, 0)
        if share * k <= FIXED_EXCHANGE_ROWS:
            expert_out = self._exchange_fixed(rows, mine, share * k)
        else:
            expert_out = self._exchange_sized(rows, mine)
        out = x.new_zeros(share, x.shape[1])
        out[: hi - lo] = self._combine(expert_out, weights[lo:hi])
        return par.ep_all_gather_rows(out)[:num_tokens]

    def _exchange_sized(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each (token, choice) row to its expert's rank and its output back, exactly as many rows as there are:
        the split sizes are read on the host (a sync a layer). For prefill-sized batches."""
        par = self.par
        dest = ids // self.num_local_experts
        order = torch.argsort(dest, stable=True)
        send_counts = _counts(dest, par.ep_size)
        recv_counts = par.ep_all_to_all(send_counts, [1] * par.ep_size, [1] * par.ep_size)
        send, recv = send_counts.tolist(), recv_counts.tolist()  # the host sync: split sizes
        got = par.ep_all_to_all(rows[order], send, recv)
        got_ids = par.ep_all_to_all(ids[order], send, recv)
        back = par.ep_all_to_all(self._experts(got, got_ids), recv, send)
        out = torch.empty_like(back)
        out[order] = back
        return out

    def _exchange_fixed(self, rows: torch.Tensor, ids: torch.Tensor, capacity: int) -> torch.Tensor:
        """The same with fixed sizes: every rank sends every rank `capacity` rows (its worst case), padding marked
        by expert id -1. No host sync, so a decode step with expert parallelism fits in a CUDA graph."""
        par, ep = self.par, self.par.ep_size
        dest = ids // self.num_local_experts
        order = torch.argsort(dest, stable=True)
        counts = _counts(dest, ep)
        starts = torch.cumsum(counts, 0) - counts
        sorted_dest = dest[order]
        slot = torch.empty_like(order)  # where each pair sits in the send buffer: its destination's block
        slot[order] = sorted_dest * capacity + torch.arange(len(order), device=ids.device) - starts[sorted_dest]
        send_rows = rows.new_zeros(ep * capacity, rows.shape[1])
        send_rows[slot] = rows
        send_ids = ids.new_full((ep * capacity,), -1)
        send_ids[slot] = ids
        sizes = [capacity] * ep
        got = par.ep_all_to_all(send_rows, sizes, sizes)
        got_ids = par.ep_all_to_all(send_ids, sizes, sizes)
        return par.ep_all_to_all(self._experts(got, got_ids), sizes, sizes)[slot]
