"""KV transfer between two GPUs of one host (the multi-GPU issue, item 2): NIXL and NCCL moving the KV of a
4k-token Llama-3-8B request (256 blocks of 2 MiB, 512 MiB) from a pool on GPU 0 to a pool on GPU 1, against
the GPU-to-GPU copy bandwidth (cudaMemcpyPeer through torch) and a raw one-buffer NIXL write, measured in
the same run.

  NCCL_NVLS_ENABLE=0 python -m bench.kv_transfer_multigpu     (needs 2 GPUs)

--quick: the same procedure between two CPU processes, with the transports that run there: the host transport
(the receiver's pool in shared memory, written by the sender) in NIXL's place, gloo in NCCL's, memcpy of the
same bytes in this process in place of the GPU-to-GPU copy, and one contiguous copy into the receiver's mapped
pool in place of the raw NIXL write; a 512-token request (32 blocks, 64 MiB). Metric names say which transport.
"""

import argparse
import multiprocessing as mp
import os
import random
import time
import uuid
from pathlib import Path

import torch

from bench.common import emit
from bench.kv_transfer import BLOCK, HEAD_DIM, HEADS, LAYERS, _shape, raw_nixl_seconds
from kv_transfer.descriptors import PoolDescriptor
from kv_transfer.host_transport import SHM_DIR, shared_pool


def _desc(agent: str, transport: str, num_blocks: int, address: str = "") -> PoolDescriptor:
    return PoolDescriptor(agent, transport, address, num_blocks, LAYERS, BLOCK, HEADS, HEAD_DIM, "bfloat16")


def _receiver(num_blocks: int, out, cmds, shm_path: str | None) -> None:
    """The decode side. GPU (shm_path None): a pool on GPU 1 behind NIXL and NCCL. CPU: a pool in the
    shared-memory file shm_path (written by the sender's host transport) behind gloo."""
    from kv_transfer.dist_transport import DistTransport

    if shm_path is None:
        from kv_transfer.nixl_transport import NixlTransport

        torch.cuda.set_device(1)
        pool = torch.zeros(_shape(num_blocks), dtype=torch.bfloat16, device="cuda:1")
        one_sided = NixlTransport("decode", staging_blocks=0)
        one_sided_desc = one_sided.register_pool(pool, _desc("decode", "nixl", num_blocks)).to_dict()
        two_sided = DistTransport("decode", backend="nccl")
    else:
        pool = shared_pool(Path(shm_path), _shape(num_blocks), torch.bfloat16)
        one_sided = None
        one_sided_desc = _desc("decode", "host", num_blocks, shm_path).to_dict()
        two_sided = DistTransport("decode", backend="gloo")
    out.put((one_sided_desc, two_sided.register_pool(pool, _desc("decode", two_sided.backend, num_blocks)).to_dict()))
    two_sided.accept("prefill")

    def sync() -> None:  # this process's GPU only (no context on the sender's)
        if pool.is_cuda:
            torch.cuda.synchronize()

    while (cmd := cmds.get(timeout=600)) is not None:
        if cmd[0] == "checksum":
            sync()
            out.put(pool[cmd[1]].view(torch.int16).double().sum().item())
            continue
        two_sided.receive_blocks("prefill", cmd)
        sync()
        out.put("ok")
    if one_sided is not None:
        one_sided.close()
    two_sided.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two CPU processes: host transport and gloo")
    ap.add_argument("--tokens", type=int, default=None, help="default 4096 (--quick: 512)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    tokens = a.tokens or (512 if a.quick else 4096)
    if not a.quick and torch.cuda.device_count() < 2:
        raise SystemExit("this benchmark needs two GPUs (or --quick: two CPU processes)")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from kv_transfer.dist_transport import DistTransport

    n = tokens // BLOCK
    blocks = 4 * n
    shm_path = str(SHM_DIR / f"pdserve-bench-{uuid.uuid4().hex}") if a.quick else None
    ctx = mp.get_context("spawn")
    out, cmds = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(blocks, out, cmds, shm_path))
    proc.start()
    try:
        if a.quick:
            pool = torch.randn(_shape(blocks)).to(torch.bfloat16)
            names = {"copy": "memcpy", "one": "host", "two": "gloo"}
            hardware = f"cpu ({os.cpu_count()} cores), two processes"
        else:
            torch.cuda.set_device(0)
            pool = torch.randn(_shape(blocks), device="cuda:0").to(torch.bfloat16)
            names = {"copy": "gpu_to_gpu_copy", "one": "nixl", "two": "nccl"}
            hardware = f"{torch.cuda.get_device_name(0)} x2"
        block_bytes = pool[0].numel() * pool.element_size()
        nbytes = n * block_bytes
        common = dict(tokens=tokens, blocks=n, mib=nbytes / 2**20, block_bytes=block_bytes, gpus=hardware)
        copy_name = "memcpy in one process" if a.quick else "GPU-to-GPU copy"
        # A copy of the same bytes (GPU: to the other GPU, peer access where the GPUs have it).
        flat0 = pool[:n].reshape(-1)
        flat1 = torch.empty_like(flat0, device="cpu" if a.quick else "cuda:1")
        peer = _best(lambda: flat1.copy_(flat0), a.repeats)
        emit("kv_transfer_multigpu", f"{names['copy']}_GB_per_s", nbytes / peer / 1e9, "GB/s",
             note="torch copy, same bytes" + ("" if a.quick else " cuda:0 -> cuda:1 (cudaMemcpyPeer)"),
             peer_access=None if a.quick else torch.cuda.can_device_access_peer(0, 1), **common)
        one_desc, two_desc = out.get(timeout=300)
        if a.quick:
            from kv_transfer.host_transport import HostTransport

            one_sided = HostTransport("prefill")
            one_sided.register_pool(pool, _desc("prefill", "host", blocks))
            one_sided.connect(PoolDescriptor.from_dict(one_desc))
            remote = one_sided.peers["decode"].view(-1)[: flat0.numel()]
            raw_t = _best(lambda: remote.copy_(flat0), a.repeats)  # one contiguous copy into the mapped pool
        else:
            from kv_transfer.nixl_transport import NixlTransport

            one_sided = NixlTransport("prefill")
            one_sided.register_pool(pool, _desc("prefill", "nixl", blocks))
            one_sided.connect(PoolDescriptor.from_dict(one_desc))
            raw_t = raw_nixl_seconds(one_sided, "decode", pool.data_ptr(), nbytes, lambda fn: _best(fn, a.repeats))
        two_sided = DistTransport("prefill", backend=names["two"])
        two_sided.register_pool(pool, _desc("prefill", names["two"], blocks))
        two_sided.connect(PoolDescriptor.from_dict(two_desc))
        raw = f"raw {names['one']} (one contiguous buffer)"
        emit("kv_transfer_multigpu", f"raw_{names['one']}_GB_per_s", nbytes / raw_t / 1e9, "GB/s", copy_name,
             nbytes / peer / 1e9, **common)
        rng = random.Random(0)
        scattered = rng.sample(range(blocks), n)
        run = list(range(n, 2 * n))
        for label, src in (("scattered_to_contiguous", scattered), ("contiguous_to_contiguous", list(range(n)))):
            t = _best(lambda src=src: one_sided.write_blocks("decode", src, run), a.repeats)
            emit("kv_transfer_multigpu", f"{names['one']}_{label}_GB_per_s", nbytes / t / 1e9, "GB/s", raw,
                 nbytes / raw_t / 1e9, vs_copy=round(peer / t, 3), **common)

            def two_sided_write(src=src) -> None:
                cmds.put(run)
                two_sided.write_blocks("decode", src, run)
                assert out.get(timeout=120) == "ok"

            t = _best(two_sided_write, a.repeats)
            emit("kv_transfer_multigpu", f"{names['two']}_{label}_GB_per_s", nbytes / t / 1e9, "GB/s", copy_name,
                 nbytes / peer / 1e9, runs=len(src) if label.startswith("scattered") else 1, **common)
        # The last write (two-sided, contiguous source) landed: compare a checksum of the first blocks it wrote.
        cmds.put(("checksum", run[:8]))
        got = out.get(timeout=60)
        expected = pool[:8].view(torch.int16).double().sum().item()
        emit("kv_transfer_multigpu", "checksum_matches", float(got == expected), "bool",
             note="the last write's first 8 blocks on the receiver vs the sender's")
        one_sided.close()
        two_sided.close()
    finally:
        cmds.put(None)
        proc.join(60)
        if proc.is_alive():
            proc.kill()
        if shm_path is not None and os.path.exists(shm_path):
            os.unlink(shm_path)


def _sync() -> None:
    """The sender's view: both GPUs (none on the CPU)."""
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)


def _best(fn, repeats: int) -> float:
    """Best wall time of fn over repeats, the GPUs (if any) synchronised."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


if __name__ == "__main__":
    main()
