"""Prefill on one engine, KV through the host transport, decode on another: same tokens as one engine (an FP8
KV pool too: its blocks move as they are, half a bf16 pool's bytes)."""

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.helpers import host_pair, make_tiny_model


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_prefill_transfer_decode_gives_colocated_tokens(kv_cache_dtype, tmp_path):
    make_tiny_model("qwen3", tmp_path, seed=5)
    cfg = EngineConfig(model=str(tmp_path), kv_cache_bytes=4 << 20, kv_cache_dtype=kv_cache_dtype)
    params = SamplingParams(max_tokens=12, temperature=0)
    shared = [(7 * j) % 300 + 1 for j in range(40)]
    turns = [shared + [5, 6, 7], shared + [5, 6, 7, 8, 9] * 5]  # the second shares 2 blocks on decode
    with host_pair(str(tmp_path), 4 << 20, kv_cache_dtype=kv_cache_dtype) as (prefill, decode, sender):
        assert str(decode.kv_cache.tensor.dtype) == ("torch.float8_e4m3fn" if kv_cache_dtype == "fp8" else "torch.float32")
        for i, prompt in enumerate(turns):
            expected = LLMEngine(cfg).generate([prompt], params)[0].token_ids
            rid = f"r{i}"
            reserved = decode.reserve_remote(rid, prompt, params)
            first = prefill.generate([prompt], SamplingParams(max_tokens=1, temperature=0))  # warms prefill's cache
            prefill.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0), hold_kv=True)
            while prefill.has_unfinished():
                out = prefill.step()
            skip = reserved.num_cached_tokens // cfg.block_size
            src = prefill.held_blocks(rid)
            sender.write_blocks("decode", src[skip:], reserved.block_ids[skip:])
            prefill.release_held(rid)
            tokens = decode.start_remote(rid, out[0].new_token_ids[0], []).new_token_ids
            while decode.has_unfinished():
                tokens += [t for o in decode.step() for t in o.new_token_ids]
            assert tokens == expected
            assert first[0].token_ids == expected[:1]
            if i == 1:
                assert reserved.num_cached_tokens == 32  # only the uncached blocks were sent
        assert prefill.block_pool.num_free_blocks == prefill.block_pool.num_blocks
        assert decode.block_pool.num_free_blocks == decode.block_pool.num_blocks
