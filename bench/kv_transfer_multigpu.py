"""KV transfer between two GPUs of one host (the multi-GPU issue, item 2): NIXL and NCCL moving the KV of a
4k-token Llama-3-8B request (256 blocks of 2 MiB, 512 MiB) from a pool on GPU 0 to a pool on GPU 1, against
the GPU-to-GPU copy bandwidth (cudaMemcpyPeer through torch) and a raw one-buffer NIXL write, measured in
the same run.

  NCCL_NVLS_ENABLE=0 python -m bench.kv_transfer_multigpu     (needs 2 GPUs)
"""

import argparse
import multiprocessing as mp
import os
import random
import time

import torch

from bench.common import emit
from bench.kv_transfer import BLOCK, HEAD_DIM, HEADS, LAYERS, _shape, raw_nixl_seconds
from kv_transfer.descriptors import PoolDescriptor


def _desc(agent: str, transport: str, num_blocks: int) -> PoolDescriptor:
    return PoolDescriptor(agent, transport, "", num_blocks, LAYERS, BLOCK, HEADS, HEAD_DIM, "bfloat16")


def _receiver(num_blocks: int, out, cmds) -> None:
    from kv_transfer.dist_transport import DistTransport
    from kv_transfer.nixl_transport import NixlTransport

    torch.cuda.set_device(1)
    pool = torch.zeros(_shape(num_blocks), dtype=torch.bfloat16, device="cuda:1")
    nixl = NixlTransport("decode", staging_blocks=0)
    nccl = DistTransport("decode", backend="nccl")
    out.put((nixl.register_pool(pool, _desc("decode", "nixl", num_blocks)).to_dict(),
             nccl.register_pool(pool, _desc("decode", "nccl", num_blocks)).to_dict()))
    nccl.accept("prefill")
    while (cmd := cmds.get(timeout=600)) is not None:
        if cmd[0] == "checksum":
            torch.cuda.synchronize()
            out.put(pool[cmd[1]].view(torch.int16).double().sum().item())
            continue
        nccl.receive_blocks("prefill", cmd)
        torch.cuda.synchronize()
        out.put("ok")
    nixl.close()
    nccl.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("this benchmark needs two GPUs")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from kv_transfer.dist_transport import DistTransport
    from kv_transfer.nixl_transport import NixlTransport

    n = a.tokens // BLOCK
    blocks = 4 * n
    ctx = mp.get_context("spawn")
    out, cmds = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(blocks, out, cmds))
    proc.start()
    try:
        torch.cuda.set_device(0)
        pool = torch.randn(_shape(blocks), device="cuda:0").to(torch.bfloat16)
        block_bytes = pool[0].numel() * pool.element_size()
        nbytes = n * block_bytes
        common = dict(tokens=a.tokens, blocks=n, mib=nbytes / 2**20, block_bytes=block_bytes,
                      gpus=f"{torch.cuda.get_device_name(0)} x2")
        # GPU-to-GPU copy of the same bytes (peer access where the GPUs have it).
        flat0 = pool[:n].reshape(-1)
        flat1 = torch.empty_like(flat0, device="cuda:1")
        peer = _best(lambda: flat1.copy_(flat0), a.repeats)
        emit("kv_transfer_multigpu", "gpu_to_gpu_copy_GB_per_s", nbytes / peer / 1e9, "GB/s",
             note="torch copy cuda:0 -> cuda:1 (cudaMemcpyPeer)", peer_access=torch.cuda.can_device_access_peer(0, 1),
             **common)
        nixl_desc, nccl_desc = out.get(timeout=300)
        nixl = NixlTransport("prefill")
        nixl.register_pool(pool, _desc("prefill", "nixl", blocks))
        nixl.connect(PoolDescriptor.from_dict(nixl_desc))
        nccl = DistTransport("prefill", backend="nccl")
        nccl.register_pool(pool, _desc("prefill", "nccl", blocks))
        nccl.connect(PoolDescriptor.from_dict(nccl_desc))
        raw_t = raw_nixl_seconds(nixl, "decode", pool.data_ptr(), nbytes, lambda fn: _best(fn, a.repeats))
        emit("kv_transfer_multigpu", "raw_nixl_GB_per_s", nbytes / raw_t / 1e9, "GB/s", "GPU-to-GPU copy",
             nbytes / peer / 1e9, **common)
        rng = random.Random(0)
        scattered = rng.sample(range(blocks), n)
        run = list(range(n, 2 * n))
        for label, src in (("scattered_to_contiguous", scattered), ("contiguous_to_contiguous", list(range(n)))):
            t = _best(lambda src=src: nixl.write_blocks("decode", src, run), a.repeats)
            emit("kv_transfer_multigpu", f"nixl_{label}_GB_per_s", nbytes / t / 1e9, "GB/s", "raw NIXL",
                 nbytes / raw_t / 1e9, vs_gpu_copy=round(peer / t, 3), **common)

            def nccl_write(src=src) -> None:
                cmds.put(run)
                nccl.write_blocks("decode", src, run)
                assert out.get(timeout=120) == "ok"

            t = _best(nccl_write, a.repeats)
            emit("kv_transfer_multigpu", f"nccl_{label}_GB_per_s", nbytes / t / 1e9, "GB/s", "GPU-to-GPU copy",
                 nbytes / peer / 1e9, runs=len(src) if label.startswith("scattered") else 1, **common)
        # The last write (NCCL, contiguous source) landed: compare a checksum of the first blocks it wrote.
        cmds.put(("checksum", run[:8]))
        got = out.get(timeout=60)
        expected = pool[:8].view(torch.int16).double().sum().item()
        emit("kv_transfer_multigpu", "checksum_matches", float(got == expected), "bool",
             note="the last write's first 8 blocks on the receiver vs the sender's")
        nixl.close()
        nccl.close()
    finally:
        cmds.put(None)
        proc.join(60)
        if proc.is_alive():
            proc.kill()


def _best(fn, repeats: int) -> float:
    """Best wall time of fn over repeats, both GPUs synchronised."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        for d in range(2):
            torch.cuda.synchronize(d)
        t = time.perf_counter()
        fn()
        for d in range(2):
            torch.cuda.synchronize(d)
        best = min(best, time.perf_counter() - t)
    return best


if __name__ == "__main__":
    main()
