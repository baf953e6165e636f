"""Multi-LoRA decode (issue 36): a batch whose requests use 8 different adapters against the same batch on the
base model alone, in one engine, in the same run (JSON lines).

1. `decode_tokens_per_s_8_adapters`: decode tokens/s of `batch` requests, round-robin over 8 adapters of rank
   16 on every projection (q/k/v/o, gate/up/down), against the same requests without adapters. Each is timed as
   (N tokens) - (1 token): the decode steps alone. Issue 36's bar (GPU): >= 0.8.
2. `adapter_load_ms`: copying an adapter from its host copy into a device slot (Adapters.acquire of one not
   resident), against one copy of as many bytes host -> device in the same run.

Weights are random (load_format=dummy), adapters random too (written as PEFT folders); prefix caching is off
and every prompt differs, so neither side reuses what the other computed.

  python -m bench.lora            # GPU: Llama-3-8B shapes, bf16, batch 64, 8 adapters of rank 16
  python -m bench.lora --quick    # CPU: a 4-layer Llama of hidden size 256, batch 16, rank 8
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit
from bench.engine_gpu import LLAMA3_8B, QUICK_LLAMA, config_folder

TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(folder: Path, shapes: dict, rank: int, seed: int) -> None:
    """A random PEFT LoRA adapter on every projection of every layer, as peft saves one."""
    from safetensors.torch import save_file

    hidden, heads, kv = shapes["hidden_size"], shapes["num_attention_heads"], shapes["num_key_value_heads"]
    d = shapes.get("head_dim", hidden // heads)
    dims = {"q_proj": (hidden, heads * d), "k_proj": (hidden, kv * d), "v_proj": (hidden, kv * d),
            "o_proj": (heads * d, hidden), "gate_proj": (hidden, shapes["intermediate_size"]),
            "up_proj": (hidden, shapes["intermediate_size"]), "down_proj": (shapes["intermediate_size"], hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shapes["num_hidden_layers"]):
        for module, part in TARGETS.items():
            inp, out = dims[module]
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.02
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "bias": "none"}))


def _decode_seconds(engine, prompts: list[list[int]], adapters: list[str | None], tokens: int) -> float:
    """Seconds of the decode steps of a batch: (tokens) - (1 token), the better of two runs."""
    from engine.sampling_params import SamplingParams

    def run(n: int) -> float:
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, adapter=a) for a in adapters]
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate(prompts, params)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return min(run(tokens) - run(1) for _ in range(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU: a small Llama, batch 16, rank 8")
    ap.add_argument("--tokens", type=int, default=None, help="tokens a request (default 64; quick 16)")
    a = ap.parse_args()
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    gpu = torch.cuda.is_available() and not a.quick
    shapes, batch, rank, kv = (LLAMA3_8B, 64, 16, 16 << 30) if gpu else (QUICK_LLAMA, 16, 8, 64 << 20)
    tokens, num_adapters, prompt_len = a.tokens or (64 if gpu else 16), 8, 128
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(num_adapters):
            write_adapter(Path(tmp) / f"lora{i}", shapes, rank, seed=i)
        engine = LLMEngine(EngineConfig(
            model=str(config_folder(shapes)), load_format="dummy", device="cuda" if gpu else "cpu",
            kv_cache_bytes=kv, max_num_seqs=batch, enable_prefix_caching=False, max_loras=num_adapters,
            max_lora_rank=rank, max_cpu_loras=num_adapters + 1))
        names = [f"lora{i}" for i in range(num_adapters)]
        for name in names:
            engine.load_adapter(name, str(Path(tmp) / name))
        gen = torch.Generator().manual_seed(0)
        vocab = shapes["vocab_size"]

        def prompts() -> list[list[int]]:  # fresh ones each run
            return torch.randint(10, vocab - 10, (batch, prompt_len), generator=gen).tolist()

        mixed = [names[i % num_adapters] for i in range(batch)]
        _decode_seconds(engine, prompts()[:8], mixed[:8], 4)  # warm-up: every adapter placed, both paths run
        base_s = _decode_seconds(engine, prompts(), [None] * batch, tokens)
        lora_s = _decode_seconds(engine, prompts(), mixed, tokens)
        n = batch * (tokens - 1)
        common = dict(batch=batch, adapters=num_adapters, rank=rank, tokens=tokens, layers=shapes["num_hidden_layers"],
                      hidden=shapes["hidden_size"])
        emit("lora", "decode_tokens_per_s_8_adapters", n / lora_s, "tok/s", baseline="the base model alone",
             baseline_value=n / base_s, bar=0.8 if gpu else None, **common)

        # Loading from host: a slot is refilled with an adapter it does not hold.
        adapters = engine.adapters
        extra = Path(tmp) / "extra"
        write_adapter(extra, shapes, rank, seed=99)
        engine.load_adapter("extra", str(extra))
        adapter = adapters.get("extra")
        nbytes = sum((x.numel() + y.numel()) * adapters.slots.a[0, "qkv"].element_size()
                     for x, y in adapter.weights.values())
        device = adapters.slots.a[0, "qkv"].device
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=gpu)
        target = torch.empty(nbytes, dtype=torch.uint8, device=device)
        load_ms, copy_ms = [], []
        for _ in range(3):
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            slot = adapters.acquire(adapter)
            if gpu:
                torch.cuda.synchronize()
            load_ms.append((time.perf_counter() - start) * 1e3)
            adapters.release(slot)
            adapters.forget(slot)  # (the next acquire copies it again)
            start = time.perf_counter()
            target.copy_(host)
            if gpu:
                torch.cuda.synchronize()
            copy_ms.append((time.perf_counter() - start) * 1e3)
        emit("lora", "adapter_load_ms", min(load_ms), "ms", baseline="one host-to-device copy of its bytes",
             baseline_value=min(copy_ms), adapter_bytes=nbytes, **common)


if __name__ == "__main__":
    main()
