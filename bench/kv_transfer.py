"""KV transfer bandwidth for one realistic request: the KV of a 4k-token prompt with Llama-3-8B's shapes
(32 layers, 8 KV heads, head_dim 128, bf16, block_size 16: 256 blocks, 512 MiB) at scattered block ids.

CPU (--quick or no GPU): the host transport between two processes (shared memory), against memcpy of the
same bytes in this process, in the same run.
"""

import argparse
import multiprocessing as mp
import random
import time
import uuid

import torch

from bench.common import emit
from kv_transfer.descriptors import PoolDescriptor
from kv_transfer.host_transport import SHM_DIR, HostTransport, shared_pool

LAYERS, HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def _shape(num_blocks: int) -> tuple[int, ...]:
    return (num_blocks + 1, LAYERS, 2, BLOCK, HEADS, HEAD_DIM)


def _desc(agent: str, path: str, num_blocks: int) -> PoolDescriptor:
    return PoolDescriptor(agent, "host", path, num_blocks, LAYERS, BLOCK, HEADS, HEAD_DIM, "bfloat16")


def _receiver(path: str, num_blocks: int, ready, done) -> None:
    shared_pool(__import__("pathlib").Path(path), _shape(num_blocks), torch.bfloat16)
    ready.set()
    done.wait(600)


def host_vs_memcpy(tokens: int, pool_blocks: int, repeats: int) -> None:
    n = tokens // BLOCK
    rng = random.Random(0)
    src_ids = sorted(rng.sample(range(pool_blocks), n))
    dst_ids = rng.sample(range(pool_blocks), n)  # scattered on both sides
    path = str(SHM_DIR / f"pdserve-bench-{uuid.uuid4().hex}")
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_receiver, args=(path, pool_blocks, ready, done))
    proc.start()
    try:
        ready.wait(120)
        src = torch.randn(_shape(pool_blocks), dtype=torch.bfloat16)
        sender = HostTransport("prefill")
        sender.register_pool(src, _desc("prefill", "", pool_blocks))
        sender.connect(_desc("decode", path, pool_blocks))
        nbytes = n * src[0].numel() * src.element_size()
        flat_src = torch.randn(nbytes // 2, dtype=torch.bfloat16)
        flat_dst = torch.empty_like(flat_src)
        best_host, best_copy = float("inf"), float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            sender.write_blocks("decode", src_ids, dst_ids)
            best_host = min(best_host, time.perf_counter() - t)
            t = time.perf_counter()
            flat_dst.copy_(flat_src)
            best_copy = min(best_copy, time.perf_counter() - t)
        emit("kv_transfer", "host_transport_GB_per_s", nbytes / best_host / 1e9, "GB/s", "memcpy of the same bytes",
             nbytes / best_copy / 1e9, tokens=tokens, blocks=n, block_bytes=nbytes // n, scattered=True,
             mib=nbytes / 2**20, threads=torch.get_num_threads())
    finally:
        done.set()
        proc.join(30)
        __import__("os").unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args()
    tokens = 1024 if a.quick else a.tokens
    host_vs_memcpy(tokens, pool_blocks=4 * tokens // BLOCK, repeats=3 if a.quick else 5)


if __name__ == "__main__":
    main()
