"""The host KV tier (engine/kv_tiers.py) on a multi-turn workload whose working set is several times the KV
pool: JSON lines.

Tenants each have a long system prompt and come back turn after turn, every other tenant's turn in between
(turns "minutes apart": by a tenant's next turn its blocks have left the pool). The same request sequence
runs on a fresh engine with the pool only and on one with the pool and a host tier, one after the other
(neither runs on the other's cache). Requests go in waves of one turn per tenant in a group; TTFT is a
request's time from its wave's start to its first token, throughput the tokens generated over the wall time.
Issue 35's bars: TTFT p90 >= 2x better and throughput >= 1.3x with the tier (GPU); loading a block run from
the tier at >= 50% of the host-to-device copy bandwidth measured in the same run.

  python -m bench.kv_tiers              # GPU: Llama-3-8B shapes (random bf16 weights), 2 GiB pool, 16 GiB tier
  python -m bench.kv_tiers --quick      # CPU: the demo model, a 24-block pool
"""

import argparse
import gc
import time
from pathlib import Path

import numpy as np

from bench.common import emit


def workload(tenants: int, turns: int, system_len: int, user_len: int, seed: int = 0) -> list[list[list[int]]]:
    """waves[turn][tenant] = the prompt: the tenant's system prompt, then its earlier turns, then a new message
    (token ids; the model's answers are not fed back: a turn's prefix is the system prompt and earlier
    messages, as a chat's is)."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(100, 30000, system_len).tolist() for _ in range(tenants)]
    history = [list(s) for s in systems]
    waves = []
    for _ in range(turns):
        wave = []
        for t in range(tenants):
            history[t] = history[t] + rng.integers(100, 30000, user_len).tolist()
            wave.append(list(history[t]))
        waves.append(wave)
    return waves


def run(engine, waves: list[list[list[int]]], group: int, output_len: int) -> dict:
    """Waves of `group` requests (different tenants) at a time; TTFTs, tokens, wall time and prefix hits."""
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    ttfts, tokens, prompt_tokens, cached = [], 0, 0, 0
    t_start = time.perf_counter()
    n = 0
    for wave in waves:
        for i in range(0, len(wave), group):
            t0 = time.perf_counter()
            ids = {}
            for prompt in wave[i : i + group]:
                rid = f"r{n}"
                n += 1
                engine.add_request(rid, prompt, params)
                ids[rid] = None
                prompt_tokens += len(prompt)
            while engine.has_unfinished():
                for o in engine.step():
                    if o.request_id in ids and ids[o.request_id] is None and o.new_token_ids:
                        ids[o.request_id] = time.perf_counter() - t0
                        cached += o.num_cached_tokens
                    tokens += len(o.new_token_ids)
            ttfts += list(ids.values())
    return {"wall": time.perf_counter() - t_start, "ttft": np.array(ttfts), "tokens": tokens,
            "hit": cached / prompt_tokens}


def load_bandwidth(engine, blocks: int) -> tuple[float, float]:
    """(GB/s loading a run of blocks from the host tier into the pool, GB/s of a plain host-to-device copy of
    the same bytes from pinned memory): the best of several."""
    import torch

    tier, pool = engine.host_tier, engine.kv_cache.tensor
    blocks = min(blocks, tier.num_blocks, pool.shape[0] - 1)
    sync = torch.cuda.synchronize if pool.is_cuda else (lambda: None)
    nbytes = blocks * pool[0].numel() * pool.element_size()
    src = torch.empty((blocks, *pool.shape[1:]), dtype=pool.dtype, pin_memory=pool.is_cuda)
    best_tier = best_copy = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        tier.load(list(range(blocks)), list(range(blocks)))
        sync()
        best_tier = min(best_tier, time.perf_counter() - t0)
        t0 = time.perf_counter()
        pool[:blocks].copy_(src, non_blocking=True)
        sync()
        best_copy = min(best_copy, time.perf_counter() - t0)
    return nbytes / best_tier / 1e9, nbytes / best_copy / 1e9


def _block_bytes(model: str, cuda: bool) -> int:
    """A KV block's bytes (16 tokens, every layer, keys and values; bf16 on a GPU, float32 on the CPU)."""
    from engine.model_config import ModelConfig
    from engine.weight_loader import open_model

    cfg = ModelConfig.from_hf_dir(model) if Path(model).is_dir() else open_model(model)[0]
    return cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * (2 if cuda else 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU, the demo model, a small pool")
    ap.add_argument("--tokenizer-dir", default=".gpu/tokenizer", help="tokenizer files for the random-weight shapes")
    a = ap.parse_args()
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    if a.quick:
        from pdserve_cli.main import demo_model

        model, extra = demo_model(), {"device": "cpu"}
        tenants, turns, system_len, user_len, group, output_len = 8, 3, 96, 16, 3, 4
        pool_blocks, tier_blocks = 24, 160
    else:
        from bench.disagg import dummy_model
        from bench.engine_gpu import LLAMA3_8B

        model, extra = str(dummy_model(Path(a.tokenizer_dir), LLAMA3_8B)), {"load_format": "dummy"}
        tenants, turns, system_len, user_len, group, output_len = 32, 4, 2048, 128, 8, 32
        pool_blocks, tier_blocks = 1024, 8192
    block_bytes = _block_bytes(model, cuda=not a.quick)
    waves = workload(tenants, turns, system_len, user_len)
    working_set = sum(len(p) for p in waves[-1]) // 16
    results = {}
    for name, tier in (("pool only", 0), ("host tier", tier_blocks)):
        gc.collect()
        engine = LLMEngine(EngineConfig(model=model, kv_cache_bytes=pool_blocks * block_bytes, max_num_seqs=group,
                                        kv_host_bytes=tier * block_bytes, **extra))
        run(engine, workload(2, 1, 64, 8, seed=99), group, 2)  # warm-up (kernels, graphs) on other prompts
        results[name] = run(engine, waves, group, output_len)
        if tier:
            tier_gbs, copy_gbs = load_bandwidth(engine, 64)
        del engine
    base, tiered = results["pool only"], results["host tier"]
    shape = dict(tenants=tenants, turns=turns, system_tokens=system_len, pool_blocks=pool_blocks,
                 tier_blocks=tier_blocks, working_set_blocks=working_set)
    emit("kv_tiers", "ttft_p90_host_tier", float(np.percentile(tiered["ttft"], 90)) * 1e3, "ms",
         baseline="pool only", baseline_value=float(np.percentile(base["ttft"], 90)) * 1e3, **shape)
    emit("kv_tiers", "ttft_p50_host_tier", float(np.percentile(tiered["ttft"], 50)) * 1e3, "ms",
         baseline="pool only", baseline_value=float(np.percentile(base["ttft"], 50)) * 1e3)
    emit("kv_tiers", "throughput_host_tier", tiered["tokens"] / tiered["wall"], "tok/s", baseline="pool only",
         baseline_value=base["tokens"] / base["wall"])
    emit("kv_tiers", "prefix_hit_rate_host_tier", tiered["hit"], "share", baseline="pool only",
         baseline_value=base["hit"] or None)
    emit("kv_tiers", "tier_load_bandwidth", tier_gbs, "GB/s", baseline="host-to-device copy",
         baseline_value=copy_gbs, hardware_limit=True, ratio=tier_gbs / copy_gbs)


if __name__ == "__main__":
    main()
