"""`pdserve profile`: measure what one worker of a model and shape does, for the SLA planner (router/planner.py):
prefill tokens/s against prompt length and the decode step (ITL) against batch size, at a stated context. It
runs the engine in this process on this machine's device (a GPU, or the CPU) and writes a JSON profile that
`--planner-profile` (and the chart's `planner.profile`) reads.

Prefill: `prompts` fresh random prompts of each length (no prefix cache), one output token each; tokens/s is
prompt tokens over the wall time. Decode: for each context length, a batch of fresh requests of that many
prompt tokens, timed at two output lengths; the step is the difference over the extra tokens (the prefill
cancels out).
"""

import argparse
import json
import platform
import sys
import time


def measure(engine, prefill_lens: list[int], batches: list[int], contexts: list[int], prompts: int, steps: int,
            vocab: int, seed: int = 0) -> tuple[list[tuple[int, float]], list[tuple[int, int, float]]]:
    import numpy as np

    from engine.sampling_params import SamplingParams

    rng = np.random.default_rng(seed)

    def run(n: int, length: int, tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        batch = [rng.integers(100, vocab - 1, length).tolist() for _ in range(n)]
        t0 = time.perf_counter()
        engine.generate(batch, params)
        return time.perf_counter() - t0

    run(2, min(prefill_lens), 2)  # warm-up (kernels, graphs)
    prefill = [(n, n * prompts / run(prompts, n, 1)) for n in prefill_lens]
    decode = []
    for context in contexts:
        for b in batches:
            short, long = run(b, context, 2), run(b, context, 2 + steps)
            decode.append((b, context, max(1e-6, (long - short) / steps)))
    return prefill, decode


def run(a: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from pdserve_cli.main import demo_model
    from router.planner import Profile

    quick = a.quick
    prefill_lens = [int(x) for x in (a.prefill_lens or ("16,64" if quick else "128,512,2048,8192")).split(",")]
    batches = [int(x) for x in (a.batches or ("1,4" if quick else "1,8,32,64,128,256")).split(",")]
    contexts = [int(x) for x in (a.contexts or ("32" if quick else "512,2048,8192")).split(",")]
    model = a.model or demo_model()
    config = EngineConfig(model=model, device=a.device, max_num_seqs=max(batches),
                          kv_cache_bytes=a.kv_cache_bytes, load_format=a.load_format,
                          max_model_len=max(*prefill_lens, *contexts) + max(a.steps, 4) + 8)
    engine = LLMEngine(config)
    prefill, decode = measure(engine, prefill_lens, batches, contexts, 2 if quick else a.prompts,
                              4 if quick else a.steps, engine.model_config.vocab_size)
    device = str(engine.device)
    if engine.device.type == "cuda":
        import torch

        device = torch.cuda.get_device_name(engine.device)
    profile = Profile(prefill=prefill, decode=decode, model=a.served_name or str(model),
                      worker=f"{device}, tp 1" + (f" ({platform.node()})" if engine.device.type == "cpu" else ""))
    profile.dump(a.out)
    print(json.dumps({"out": a.out, "prefill_tokens_per_s": dict(prefill),
                      "decode_step_s": {f"batch {b} at {c}": s for b, c, s in decode}}))
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("profile", help="measure a worker's prefill and decode speeds for the SLA planner")
    p.add_argument("--model", default=None, help="a GGUF file or a Hugging Face folder (default: the demo model)")
    p.add_argument("--served-model-name", dest="served_name", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--prefill-lens", default=None, help="comma-separated prompt lengths (default 128..8192)")
    p.add_argument("--batches", default=None, help="comma-separated decode batch sizes (default 1..256)")
    p.add_argument("--contexts", default=None,
                   help="comma-separated context lengths the decode step is measured at (default 512,2048,8192)")
    p.add_argument("--prompts", type=int, default=4, help="prompts a prefill length")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed a batch size")
    p.add_argument("--quick", action="store_true", help="small sizes, 2 prompts, 4 steps (CPU, the demo model)")
    p.add_argument("--out", default="profile.json")
    p.set_defaults(run=run)


if __name__ == "__main__":
    sys.exit("run it as `pdserve profile`")
