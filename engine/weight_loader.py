"""Finding a model's config and weights on disk: a Hugging Face folder (safetensors) or a GGUF file."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError
from engine.model_config import ModelConfig


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a safetensors index: {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"shards listed in {index.name} are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    return files


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice): a tensor-parallel rank reads only the rows or columns it holds."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, handle.get_slice(name)
        except SafetensorError as e:
            raise ModelLoadError(f"{f} is not a readable safetensors file: {e}") from e


def open_model(path: str | Path) -> tuple[ModelConfig, Iterator[tuple[str, Any]]]:
    """The model's config and an iterator over (Hugging Face tensor name, tensor or lazy slice of one); an FP8
    checkpoint's weights come dequantized (engine/fp8.py)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if is_gguf(path):
        from engine.gguf_file import load_gguf

        return load_gguf(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path} is neither a GGUF file nor a Hugging Face model folder")
    config, weights = ModelConfig.from_hf_dir(path), _iter_safetensors(_safetensors_files(path))
    if config.quantization == "fp8":
        from engine.fp8 import dequantized

        weights = dequantized(weights, config.weight_block_size)
    return config, weights
