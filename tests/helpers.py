"""Test helpers: the demo model's path, tiny random Hugging Face models, transformers references, and Triton
kernels run on the CPU through Triton's interpreter."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from pdserve_cli.main import demo_model


def demo_model_path() -> Path:
    return Path(demo_model())


def host_descriptor(engine, agent: str, address: str):
    """The descriptor of an engine's pool for the host transport (address: its shared-memory file)."""
    from kv_transfer.descriptors import PoolDescriptor

    lay = engine.kv_layout
    return PoolDescriptor(agent, "host", address, lay.num_blocks, lay.num_layers, lay.block_size,
                          lay.num_kv_heads, lay.head_dim, lay.dtype)


TINY_CONFIGS = {
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=320, max_position_embeddings=512,
                  rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=320,
                  max_position_embeddings=512, rope_theta=1000000.0, tie_word_embeddings=True,
                  initializer_range=0.2),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=300, max_position_embeddings=512,
                  rope_theta=500000.0, initializer_range=0.2,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Sparse MoE: layer 0 sparse and layer 1 dense (Qwen3-MoE), every layer sparse with a vocabulary that does
    # not split evenly over two ranks (Mixtral), a gated shared expert (Qwen2-MoE).
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      vocab_size=320, max_position_embeddings=512, tie_word_embeddings=False,
                      initializer_range=0.2),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=32, num_local_experts=4,
                    num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=301, max_position_embeddings=512, rope_theta=1000000.0, initializer_range=0.2),
    # Sliding-window attention shorter than the test prompts: every layer (Mistral), the upper two of three
    # (Qwen2 with use_sliding_window: layers at or above max_window_layers slide).
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=300, max_position_embeddings=512,
                    sliding_window=12, initializer_range=0.2),
    "qwen2_window": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=320, max_position_embeddings=512,
                         use_sliding_window=True, sliding_window=10, max_window_layers=1, initializer_range=0.2),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                      max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.2),
}


def make_tiny_model(kind: str, folder: Path, seed: int = 0, shard: bool = False):
    """A random-initialised transformers model saved as safetensors; returns the transformers model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    params = dict(TINY_CONFIGS[kind])
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    config.eos_token_id = None
    config.bos_token_id = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB" if shard else "10GB")
    return model


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_lora_adapter(base_hf, folder: Path, r: int, seed: int, targets: list[str], rslora: bool = False):
    """A random LoRA adapter (A and B both random: not the identity) saved by peft; returns the peft model."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, lora_dropout=0.0,
                        use_rslora=rslora)
    model = get_peft_model(copy.deepcopy(base_hf), config).eval()
    model.save_pretrained(folder)
    return model


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def write_tiny_tokenizer(folder: Path, vocab_size: int = 300) -> None:
    """A byte-level BPE tokenizer trained here on a few sentences, with a chat template: enough for workers
    and routers to run a random model where no real tokenizer can travel (the GPU machine)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "prefill and decode workers move kv blocks"] * 50
    tok.train_from_iterator(text, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "chat_template": template}))


def run_in_triton_interpreter(code: str) -> None:
    """Run `code` in a fresh Python with TRITON_INTERPRET=1 (set before triton is imported), so that CI runs a
    kernel's logic on the CPU; fails with the child's stderr. Skips without triton unless CI=true."""
    import pytest

    if os.environ.get("CI") != "true":
        pytest.importorskip("triton", reason="triton (the test extra) runs the kernel on the CPU")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def require(module: str):
    """The module, or a skip when it is not installed; under CI=true (strict) its absence fails the test."""
    import importlib
    import os

    import pytest

    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


@contextlib.contextmanager
def host_pair(model: str, kv_cache_bytes: int = 32 << 20, **engine):
    """A prefill engine and a decode engine whose pool is in shared memory, with a host transport from the one to
    the other (agent "decode"): yields (prefill, decode, sender). engine: more EngineConfig fields for both."""
    import uuid

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from kv_transfer.host_transport import SHM_DIR, HostTransport, shared_pool

    cfg = EngineConfig(model=model, kv_cache_bytes=kv_cache_bytes, **engine)
    path = SHM_DIR / f"pdserve-test-{uuid.uuid4().hex}"
    prefill = LLMEngine(cfg)
    decode = LLMEngine(cfg, kv_allocator=lambda shape, dtype: shared_pool(path, shape, dtype))
    try:
        sender = HostTransport("prefill")
        sender.register_pool(prefill.kv_cache.tensor, host_descriptor(prefill, "prefill", "unused"))
        sender.connect(host_descriptor(decode, "decode", str(path)))
        yield prefill, decode, sender
    finally:
        path.unlink(missing_ok=True)


def stream_chat(url: str, body: dict, timeout: float = 60, on_event=lambda n: None) -> tuple[str, list[dict]]:
    """POST a streamed chat completion to the router at url: (the streamed text, every event but [DONE], an
    error event included); on_event(number of events so far) after each."""
    import json

    import httpx

    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                on_event(len(events))
    return "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", [])), events
