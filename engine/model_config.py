"""The shape of a decoder model, read from a Hugging Face config.json or from GGUF metadata."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError, UnsupportedModelError

# model_type -> (qkv bias, q/k RMSNorm). All are Llama-shaped decoders with RoPE, RMSNorm, SwiGLU; the
# MoE ones replace the MLP of some or all layers by sparse experts (Qwen2-MoE adds a gated shared expert).
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
    "mixtral": (False, False),
    "qwen2_moe": (True, False),
    "qwen3_moe": (False, True),
}
MOE_ARCHITECTURES = {"mixtral", "qwen2_moe", "qwen3_moe"}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Sparse MoE (0 experts: a dense model): router top-k over num_experts SwiGLU experts in sparse_layers.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (0: none)
    sparse_layers: tuple[int, ...] = ()
    # Sliding-window attention (0: none): a token of the layers in window_layers sees the last sliding_window
    # positions (itself included), as transformers masks them (Mistral, Mixtral; Qwen's when enabled).
    sliding_window: int = 0
    window_layers: tuple[int, ...] = ()
    quantization: str | None = None  # "fp8": an FP8 checkpoint (engine/fp8.py reads it)
    weight_block_size: tuple[int, ...] = ()  # its scales' block (rows, columns); (): a scale a row or a tensor

    def attention_windows(self) -> list[int]:
        """Each layer's window (0: it sees the whole context)."""
        return [self.sliding_window if i in self.window_layers else 0 for i in range(self.num_layers)]

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ModelLoadError(f"num_experts_per_tok {self.num_experts_per_tok} is not in [1, {self.num_experts}]")

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r} ({cfg.get('architectures')}); "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        bias_default, qk_norm = SUPPORTED_ARCHITECTURES[model_type]
        rope = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = cfg.get("eos_token_id")
        try:
            heads = cfg["num_attention_heads"]
            return cls(
                architecture=model_type,
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                attention_bias=cfg.get("attention_bias", bias_default),
                qk_norm=qk_norm,
                rope_scaling=rope_scaling,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
                **_moe_fields(model_type, cfg),
                **_window_fields(model_type, cfg),
                quantization=_quantization(cfg),
                weight_block_size=tuple((cfg.get("quantization_config") or {}).get("weight_block_size") or ()),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks {e.args[0]!r}") from e

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelConfig":
        config_path = Path(path) / "config.json"
        if not config_path.exists():
            raise ModelLoadError(f"{path} has no config.json")
        try:
            return cls.from_hf_dict(json.loads(config_path.read_text()))
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{config_path} is not valid JSON: {e}") from e

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any], tensor_names: set[str]) -> "ModelConfig":
        arch = fields.get("general.architecture")
        if arch not in ("llama", "qwen2", "qwen3"):
            raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; supported: llama, qwen2, qwen3")

        def get(key: str, default: Any = None) -> Any:
            value = fields.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
            return value

        hidden = get("embedding_length")
        heads = get("attention.head_count")
        vocab = fields.get(f"{arch}.vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
        eos = fields.get("tokenizer.ggml.eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv", heads),
            head_dim=get("attention.key_length", hidden // heads),
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=get("rope.freq_base", 10000.0),
            max_position_embeddings=get("context_length", 4096),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (eos,),
        )


def _moe_fields(model_type: str, cfg: dict[str, Any]) -> dict[str, Any]:
    if model_type not in MOE_ARCHITECTURES:
        return {}
    layers = cfg["num_hidden_layers"]
    if model_type == "mixtral":  # every layer is sparse; intermediate_size is an expert's
        return dict(num_experts=cfg["num_local_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True,
                    sparse_layers=tuple(range(layers)))
    step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
    experts = cfg.get("num_experts") or cfg["num_local_experts"]  # transformers 5 writes the latter
    return dict(num_experts=experts, num_experts_per_tok=cfg["num_experts_per_tok"],
                moe_intermediate_size=cfg["moe_intermediate_size"],
                norm_topk_prob=cfg.get("norm_topk_prob", False),
                shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0) or 0,
                sparse_layers=tuple(i for i in range(layers) if i not in dense and step > 0 and (i + 1) % step == 0))


def _window_fields(model_type: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Which layers slide, as transformers decides it for each family (Qwen's only with use_sliding_window)."""
    window = cfg.get("sliding_window") or 0
    if model_type == "llama" or (model_type.startswith("qwen") and not cfg.get("use_sliding_window", False)):
        window = 0
    if not window:
        return {}
    n, types = cfg["num_hidden_layers"], cfg.get("layer_types")
    if types and model_type in ("qwen2", "qwen3", "qwen2_moe"):
        layers = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    elif model_type in ("qwen2", "qwen3"):
        layers = range(cfg.get("max_window_layers", 28), n)
    elif model_type == "qwen2_moe":
        layers = [i for i in range(n) if (i + 1) % 2 and i < cfg.get("max_window_layers", 28)]
    else:  # mistral, mixtral, qwen3_moe: every layer
        layers = range(n)
    return dict(sliding_window=window, window_layers=tuple(layers))


def _quantization(cfg: dict[str, Any]) -> str | None:
    """'fp8' for an FP8 checkpoint in a layout read here, None for an unquantized one; UnsupportedModelError for
    any other quantization."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "fp8":
        if q.get("fmt", "e4m3") != "e4m3":
            raise UnsupportedModelError(f"FP8 format {q.get('fmt')!r} is not supported (only e4m3)")
        return "fp8"
    if method == "compressed-tensors":
        groups = list((q.get("config_groups") or {}).values())
        weights = [g.get("weights") or {} for g in groups]
        if (q.get("format") in ("float-quantized", "naive-quantized") and weights
                and all(w.get("type") == "float" and w.get("num_bits") == 8
                        and w.get("strategy") in ("channel", "tensor") for w in weights)):
            return "fp8"
        raise UnsupportedModelError(
            "compressed-tensors checkpoints are read only as FP8 float-quantized weights with channel or tensor "
            f"scales; this one has format {q.get('format')!r} and weights {weights}")
    raise UnsupportedModelError(f"quantization {method!r} is not supported (FP8 checkpoints are: fp8, "
                                "compressed-tensors float-quantized)")
