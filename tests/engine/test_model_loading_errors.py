"""A broken or unsupported model file gives a clear error, not a crash deep inside."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig
from engine.errors import ModelLoadError, UnsupportedModelError
from engine.llm_engine import LLMEngine
from tests.helpers import make_tiny_model


def _load(path):
    return LLMEngine(EngineConfig(model=str(path), kv_cache_bytes=1 << 20))


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        _load(tmp_path / "nope")


def test_unsupported_architecture(tmp_path):
    make_tiny_model("qwen2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        _load(tmp_path)


def test_missing_tensor(tmp_path):
    make_tiny_model("qwen3", tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(ModelLoadError, match="lacks tensors.*layers.1.mlp.down_proj"):
        _load(tmp_path)


def test_shape_mismatch(tmp_path):
    make_tiny_model("qwen3", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="shape"):
        _load(tmp_path)


def test_missing_shard(tmp_path):
    make_tiny_model("qwen2", tmp_path, shard=True)
    next(tmp_path.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        _load(tmp_path)


def test_truncated_gguf(tmp_path, demo_gguf):
    broken = tmp_path / "broken.gguf"
    with open(demo_gguf, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(1 << 20))
    with pytest.raises(ModelLoadError, match="GGUF"):
        _load(broken)


def test_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError):
        _load(tmp_path / "notes.txt")
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        _load(tmp_path)


def test_worker_with_a_missing_model_exits_with_a_clear_message(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "worker.serve", "--role", "decode", "--model",
                        str(tmp_path / "missing.gguf"), "--port", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
