"""The router's tokenizing a request, in one run: with its cache of prompt parts (split at special tokens)
against tokenizing whole prompts (chats sharing a long system prompt, and distinct prompts), and the fast
byte-level BPE (tiktoken, ChatTokenizer.fast_bpe) against `tokenizers` on distinct prompts. Each line is
prompts tokenized a second, so its ratio (value / baseline_value) is the speedup over the baseline.

  python -m bench.router_tokenize [--quick] [--tokenizer-dir DIR] [--system-chars 6000] [--prompts 300]

--quick: 60 prompts a workload (the default takes about a second on 2 cores too; --quick is for CI).
"""

import argparse
import asyncio
import random
import time

from bench.common import emit
from bench.router_overhead import _demo_tokenizer, _prompt
from protocol.tokenizer import ChatTokenizer
from router.tokenize import BatchEncoder


async def _per_prompt_ms(enc: BatchEncoder, texts: list[str]) -> float:
    start = time.perf_counter()
    for text in texts:
        enc._last_arrival = float("-inf")  # requests one at a time: tokenized on the loop, no thread hand-off
        await enc.encode(text)
    return (time.perf_counter() - start) / len(texts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer-dir", default=None, help="default: the demo model's")
    ap.add_argument("--system-chars", type=int, default=6000)
    ap.add_argument("--user-chars", type=int, default=200)
    ap.add_argument("--distinct-chars", type=int, default=1600)
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="60 prompts a workload")
    a = ap.parse_args()
    if a.quick:
        a.prompts = 60
    tok = ChatTokenizer.from_dir(a.tokenizer_dir or _demo_tokenizer())
    rng = random.Random(0)
    system = {"role": "system", "content": _prompt(rng, a.system_chars)}
    workloads = {
        "shared_system_prompt": [tok.render_chat([system, {"role": "user", "content": _prompt(rng, a.user_chars)}])
                                 for _ in range(a.prompts)],
        "distinct_prompts": [tok.render_chat([{"role": "user", "content": _prompt(rng, a.distinct_chars)}])
                             for _ in range(a.prompts)],
    }
    for name, texts in workloads.items():
        cached = BatchEncoder(tok)
        whole = BatchEncoder(tok, cache_chars=0)
        ours, base = asyncio.run(_per_prompt_ms(cached, texts)), asyncio.run(_per_prompt_ms(whole, texts))
        assert [asyncio.run(cached.encode(t)) for t in texts[:5]] == [tok.encode(t, False) for t in texts[:5]]
        emit("router_tokenize", f"{name}_prompts_per_s", 1e3 / ours, "prompts/s", "whole prompts tokenized",
             1e3 / base, ms_per_prompt=ours, baseline_ms_per_prompt=base, splits_exactly=tok.splits_exactly, prompts=a.prompts,
             chars=sum(map(len, texts)) // len(texts))
        cached.close()
        whole.close()
    texts = workloads["distinct_prompts"]
    plain = ChatTokenizer.from_dir(a.tokenizer_dir or _demo_tokenizer(), use_fast=False)
    fast, slow = BatchEncoder(tok, cache_chars=0), BatchEncoder(plain, cache_chars=0)
    ours, base = asyncio.run(_per_prompt_ms(fast, texts)), asyncio.run(_per_prompt_ms(slow, texts))
    assert [asyncio.run(fast.encode(t)) for t in texts] == [asyncio.run(slow.encode(t)) for t in texts]
    emit("router_tokenize", "fast_bpe_prompts_per_s", 1e3 / ours, "prompts/s", "tokenizers (encode_batch_fast)",
         1e3 / base, ms_per_prompt=ours, baseline_ms_per_prompt=base, fast=fast.fast, prompts=a.prompts, chars=sum(map(len, texts)) // len(texts))
    fast.close()
    slow.close()


if __name__ == "__main__":
    main()
