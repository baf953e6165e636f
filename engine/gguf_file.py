"""Reading a GGUF file: model config from its metadata, tensors dequantised to float32 with HF names."""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import ModelLoadError
from engine.model_config import ModelConfig

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_SKIPPED = {"rope_freqs"}  # llama3 rope factors are recomputed from config
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Arrays of the tokenizer are large; only their length is needed for the config.
_BIG_FIELDS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}


def _open(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on truncated files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e


def read_metadata(reader: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key in _BIG_FIELDS:
            fields[key] = range(len(f.data))
        else:
            fields[key] = f.contents()
    return fields


def hf_name(gguf_name: str) -> str | None:
    m = _BLOCK.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        if part not in _LAYER_NAMES:
            raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _SKIPPED:
        return None
    if base not in _GLOBAL_NAMES:
        raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}")
    return f"{_GLOBAL_NAMES[base]}.{kind}"


def _unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two RoPE halves of each head for llama models; undo it.
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def load_gguf(path: str | Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    from gguf.quants import dequantize

    path = Path(path)
    reader = _open(path)
    names = {t.name for t in reader.tensors}
    config = ModelConfig.from_gguf_fields(read_metadata(reader), names)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            try:
                w = dequantize(t.data, t.tensor_type)
            except (NotImplementedError, ValueError) as e:
                raise ModelLoadError(f"cannot dequantise {t.name} ({t.tensor_type.name}): {e}") from e
            w = np.ascontiguousarray(w, dtype=np.float32)
            if not w.flags.writeable:  # unquantised tensors are read-only views of the memory-mapped file
                w = w.copy()
            if config.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
                w = _unpermute_qk(w, config.num_heads if ".q_proj." in name else config.num_kv_heads)
            yield name, torch.from_numpy(w)

    return config, tensors()
