"""Engine throughput against transformers.generate on the same weights, in the same run.

--quick (CPU, < 1 min): the demo model (SmolLM2-135M GGUF): prefill tokens/s, decode tokens/s at batch 1
and 8. The GPU mode (see bench/engine_gpu.py) measures decode against the memory roofline.
"""

import argparse
import time

import torch

from bench.common import emit


def _ours(model_path: str, prompts: list[list[int]], new_tokens: int) -> float:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = _ours.cache.get(model_path)
    if engine is None:
        engine = _ours.cache[model_path] = LLMEngine(EngineConfig(model=model_path, kv_cache_bytes=256 << 20,
                                                                   enable_prefix_caching=False))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    engine.generate(prompts, params)
    return time.perf_counter() - start


_ours.cache = {}


def _hf(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small CPU run (the only mode on CPU)")
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default: the demo model)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args, _ = ap.parse_known_args()  # the GPU mode takes its own flags
    if not args.quick and torch.cuda.is_available():
        from bench.engine_gpu import main as gpu_main

        gpu_main()
        return

    from transformers import AutoModelForCausalLM

    from pdserve_cli.main import demo_model

    path = args.model or demo_model()
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    if path.endswith(".gguf"):
        from pathlib import Path

        p = Path(path)
        hf = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def prompts(batch: int) -> list[list[int]]:
        return torch.randint(100, vocab - 100, (batch, args.prompt_len), generator=g).tolist()

    common = {"model": path.rsplit("/", 1)[-1], "prompt_len": args.prompt_len, "threads": torch.get_num_threads()}
    # Prefill: one request, one output token; best of the repeats.
    p1 = prompts(1)
    _ours(path, p1, 1)  # warm-up (and model load)
    ours = min(_ours(path, p1, 1) for _ in range(args.repeats))
    ref = min(_hf(hf, p1, 1) for _ in range(args.repeats))
    emit("engine", "prefill_tokens_per_s", args.prompt_len / ours, "tok/s", "transformers.generate",
         args.prompt_len / ref, **common)
    for batch in (1, 8):
        pb = prompts(batch)
        # Decode rate: (time for n tokens - time for 1 token) covers n-1 decode steps of `batch` requests.
        t_ours = min(_ours(path, pb, args.new_tokens) - _ours(path, pb, 1) for _ in range(args.repeats))
        t_ref = min(_hf(hf, pb, args.new_tokens) - _hf(hf, pb, 1) for _ in range(args.repeats))
        n = batch * (args.new_tokens - 1)
        emit("engine", f"decode_tokens_per_s_batch{batch}", n / t_ours, "tok/s", "transformers.generate",
             n / t_ref, batch=batch, new_tokens=args.new_tokens, **common)


if __name__ == "__main__":
    main()
