"""Llama-family decoders (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) and their sparse-MoE kin (Mixtral,
Qwen2-MoE, Qwen3-MoE) over a paged KV cache, tensor-parallel over the ranks of a Parallel.

Tokens of all requests in a step are packed into one [num_tokens] batch; attention goes through the
backend, which knows each request's boundaries and blocks. Under tensor parallelism a rank holds a slice
of the heads, the MLP's intermediate dimension and the vocabulary; the two projections that leave a slice
(o_proj, down_proj) give partial sums, all-reduced once each in the decoder layer.
"""

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine import fused, gemv
from engine.attention.backend import AttentionBackend
from engine.errors import ModelLoadError
from engine.layers import MLP, RMSNorm, RotaryEmbedding
from engine.model_config import ModelConfig
from engine.moe import SparseMoE
from engine.parallel import SINGLE, HeadShard, Parallel


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, heads: HeadShard):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = heads.num_heads * cfg.head_dim, heads.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.use_fused = False
        self.lora: Any = None  # engine/lora.py's LayerLora, when the engine serves adapters

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                attn: AttentionBackend) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.lora is not None:
            qkv = self.lora.add_first(x, qkv)
        return self.attend(qkv, positions, rotary, attn)

    def _out(self, out: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output [num_tokens, q_size] (with the step's adapters)."""
        y = gemv.linear(out, self.o_proj)
        return y if self.lora is None else self.lora.add_second(out, y)

    def attend(self, qkv: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
               attn: AttentionBackend) -> torch.Tensor:
        """Everything after the qkv projection: rotary, the KV write, attention and o_proj."""
        num_tokens, heads, kv_heads, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k = qkv[:, : self.q_size], qkv[:, self.q_size : self.q_size + self.kv_size]
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, kv_heads, d)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(num_tokens, heads, d))
            k = self.k_norm(k.reshape(num_tokens, kv_heads, d))
        elif self.use_fused and fused.ROPE_AND_STORE and attn.store_rotated:  # rotary + KV write: one kernel
            return self._out(attn.forward_rotating(self.layer, qkv, positions, rotary.cos_sin())
                             .reshape(num_tokens, self.q_size))
        if self.use_fused:  # in place, one kernel; q and k stay views into qkv (k beside v: one KV write)
            fused.rotate_(positions, q, k, d, rotary.cos_sin())
            q, k = q.view(num_tokens, heads, d), k.view(num_tokens, kv_heads, d)
        elif self.q_norm is None:  # q and k are adjacent in qkv: rotated together, one set of kernels
            qk = rotary.rotate(qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, d),
                               rotary.lookup(positions, qkv.dtype))
            q, k = qk[:, :heads], qk[:, heads:]
        else:
            cos_sin = rotary.lookup(positions, qkv.dtype)
            q, k = rotary.rotate(q, cos_sin), rotary.rotate(k, cos_sin)
        out = attn.forward(self.layer, q, k, v)  # [num_tokens, heads, head_dim]
        return self._out(out.reshape(num_tokens, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, heads: HeadShard, par: Parallel):
        super().__init__()
        self.par = par
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, heads)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (SparseMoE(cfg, par) if layer in cfg.sparse_layers
                    else MLP(cfg.hidden_size, cfg.intermediate_size, par))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rotary: RotaryEmbedding, attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(the layer's output, the residual stream before it): the residual add is left to the next norm,
        so that add and norm are one kernel on the fused path."""
        # Norms and SiLU inside the GEMVs (engine/gemv.py), unless the step's adapters need the normed inputs.
        lora = self.self_attn.lora
        if self.gemv_path and x.shape[0] <= gemv.MAX_TOKENS and not (lora is not None and lora.active):
            qkv, residual = gemv.norm_linear(x, residual, self.input_layernorm, self.self_attn.qkv_proj)
            x = self.par.tp_all_reduce(self.self_attn.attend(qkv, positions, rotary, attn))
            h, residual = gemv.norm_linear(x, residual, self.post_attention_layernorm, self.mlp.gate_up_proj)
            return self.par.tp_all_reduce(gemv.act_linear(h, self.mlp.down_proj, fused.silu_and_mul)), residual
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.par.tp_all_reduce(self.self_attn(x, positions, rotary, attn))
        x, residual = self.post_attention_layernorm(x, residual)
        return self.par.tp_all_reduce(self.mlp(x)), residual

    @property
    def gemv_path(self) -> bool:
        """Fused kernels, a dense MLP: the one-token path may take engine/gemv.py's kernels (where tuned)."""
        return isinstance(self.mlp, MLP) and self.mlp.use_fused


class VocabParallelEmbedding(nn.Module):
    """The embedding table's rows [start, start + rows) on this rank; a token elsewhere embeds to zero here
    and the all-reduce fills it in."""

    def __init__(self, vocab_size: int, hidden: int, par: Parallel):
        super().__init__()
        self.par = par
        self.start, self.rows = par.vocab_rows(vocab_size)
        self.valid_rows = max(0, min(self.rows, vocab_size - self.start))  # the rest pads the last shard
        self.weight = nn.Parameter(torch.empty(self.rows, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.par.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.par.tp_all_reduce(x)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None, par: Parallel = SINGLE):
        super().__init__()
        self.config = cfg
        self.par = par
        self.heads = par.heads(cfg.num_heads, cfg.num_kv_heads)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, par)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.heads, par) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings,
                                      cfg.rope_theta, cfg.rope_scaling)
        rows = self.embed_tokens.rows
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, rows, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary, attn)
        return self.norm(x, residual)[0]

    def use_fused_kernels(self) -> None:
        """Norms, rotary and SwiGLU through engine/fused.py's kernels (CUDA with FlashInfer attention)."""
        for m in self.modules():
            if hasattr(m, "use_fused"):
                m.use_fused = True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> float32 logits over the whole vocabulary [n, vocab] (gathered from the tp ranks)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = self.par.tp_all_gather(F.linear(hidden, weight))
        return logits[:, : self.config.vocab_size].float()

    @torch.no_grad()
    def init_dummy_weights(self, seed: int, std: float = 0.02, head_std: float = 0.1) -> None:
        """Random weights of the right shapes (for benchmarks and GPU checks without a checkpoint).

        The output projection is wider than the rest so that next-token distributions are peaked, as a
        trained model's are: greedy decoding then has clear winners instead of near-ties.
        """
        gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        head = "embed_tokens.weight" if self.lm_head is None else "lm_head.weight"
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, head_std if name == head else std, generator=gen)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Copy Hugging Face-named tensors in, each rank reading only its slice, fusing q/k/v, gate/up and the
        experts; every parameter must be filled. A weight is a tensor or a lazy slice (safetensors get_slice)."""
        params = dict(self.named_parameters())
        expected = {n: p.numel() for n, p in params.items()}
        valid = self.embed_tokens.valid_rows
        for name in ("embed_tokens.weight", "lm_head.weight"):  # the last vocab shard's padding rows
            if name in params:
                params[name].data[valid:].zero_()
                expected[name] = valid * params[name].shape[1]
        filled = dict.fromkeys(params, 0)
        for hf_name, source in weights:
            name = _canonical_name(hf_name)
            if "rotary_emb" in name or (name.startswith("lm_head") and self.lm_head is None):
                continue
            placed = self._placement(name)
            if placed is None:  # an expert another ep rank holds
                continue
            target, dst_index, src_index, full_sizes = placed
            if target not in params:
                raise ModelLoadError(f"unexpected tensor {hf_name!r} for a {self.config.architecture} model")
            dst = params[target].data[dst_index]
            shape = tuple(source.get_shape() if hasattr(source, "get_shape") else source.shape)
            implied = tuple(full_sizes.get(i, n) for i, n in enumerate(dst.shape))
            if shape != implied:
                raise ModelLoadError(f"tensor {hf_name!r} has shape {shape}, the config implies {implied}")
            dst.copy_(source[src_index])
            filled[target] += dst.numel()
        missing = [n for n in params if filled[n] != expected[n]]
        if missing:
            raise ModelLoadError(f"model file lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def _placement(self, name: str) -> tuple[str, tuple, tuple, dict[int, int]] | None:
        """Where a checkpoint tensor goes on this rank: (parameter, its index, the tensor's index to read, the
        tensor's full size along each sliced dimension)."""
        cfg, par, hs = self.config, self.par, self.heads
        parts = name.split(".")
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
        prefix = ".".join(parts[:-2])
        everything = (slice(None),)
        d = cfg.head_dim
        if module in ("q_proj", "k_proj", "v_proj"):
            q, kv = hs.num_heads * d, hs.num_kv_heads * d
            dst_start, src_start, n = {"q_proj": (0, hs.q_start * d, q), "k_proj": (q, hs.kv_start * d, kv),
                                       "v_proj": (q + kv, hs.kv_start * d, kv)}[module]
            full = (cfg.num_heads if module == "q_proj" else cfg.num_kv_heads) * d
            return (f"{prefix}.qkv_proj.{kind}", (slice(dst_start, dst_start + n),),
                    (slice(src_start, src_start + n),), {0: full})
        if module == "o_proj":
            return (name, everything, (slice(None), slice(hs.q_start * d, (hs.q_start + hs.num_heads) * d)),
                    {1: cfg.num_heads * d})
        if module in ("gate_proj", "up_proj", "down_proj") and len(parts) >= 4 and parts[-4] == "experts":
            owner = ".".join(parts[:-4])
            moe = self.get_submodule(owner)
            e = int(parts[-3]) - moe.first_expert
            if not 0 <= e < moe.num_local_experts:
                return None
            start, n = par.split(cfg.moe_intermediate_size, "moe_intermediate_size")
            full = cfg.moe_intermediate_size
            if module == "down_proj":
                return f"{owner}.w2", (e,), (slice(None), slice(start, start + n)), {1: full}
            at = 0 if module == "gate_proj" else n
            return f"{owner}.w13", (e, slice(at, at + n)), (slice(start, start + n),), {0: full}
        if module in ("gate_proj", "up_proj", "down_proj"):
            size = cfg.shared_expert_intermediate_size if parts[-3] == "shared_expert" else cfg.intermediate_size
            start, n = par.split(size, "intermediate_size")
            if module == "down_proj":
                return name, everything, (slice(None), slice(start, start + n)), {1: size}
            at = 0 if module == "gate_proj" else n
            return f"{prefix}.gate_up_proj.{kind}", (slice(at, at + n),), (slice(start, start + n),), {0: size}
        if module in ("embed_tokens", "lm_head"):
            start, n = self.embed_tokens.start, self.embed_tokens.valid_rows
            return name, (slice(0, n),), (slice(start, start + n),), {0: cfg.vocab_size}
        return name, everything, everything, {}  # norms, the MoE router, the shared expert's gate: on every rank


def _canonical_name(hf_name: str) -> str:
    """Our module path for a checkpoint name: without "model.", Mixtral's MoE spelled as the Qwen ones."""
    name = hf_name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
    for old, new in ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")):
        if ".experts." in name:
            name = name.replace(old, new)
    return name
