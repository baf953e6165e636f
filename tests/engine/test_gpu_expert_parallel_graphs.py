"""Expert-parallel decode on two GPUs in CUDA graphs gives the greedy tokens of the same two ranks decoding
eagerly (EngineConfig.ep_cuda_graphs: the NCCL exchange of every MoE layer is captured in the graphs)."""

import json
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.engine.test_gpu_moe import SMALL_MOE

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA GPUs")]


def _rank(rank: int, port: int, folder: str, prompts: list[list[int]], results) -> None:
    import os

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.parallel import ParallelConfig, init_parallel
    from engine.sampling_params import SamplingParams

    torch.cuda.set_device(rank)
    par = init_parallel(ParallelConfig(1, 2), rank, f"tcp://127.0.0.1:{port}", torch.device("cuda", rank))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    for graphs in (False, True):
        engine = LLMEngine(EngineConfig(model=folder, load_format="dummy", device="cuda", dtype="bfloat16",
                                        kv_cache_bytes=1 << 30, max_num_seqs=8, ep_cuda_graphs=graphs), parallel=par)
        if rank == 0:
            results[f"captured_{graphs}"] = engine.runner.graphs is not None
            results[str(graphs)] = [r.token_ids for r in engine.generate(prompts, params)]
            engine.runner.stop_followers()
        else:
            engine.runner.follow()
        del engine
        torch.cuda.synchronize()
    sys.stdout.flush()
    os._exit(0)  # not destroy_process_group (it can hang once the other rank has left)


def test_two_ep_ranks_decode_the_same_tokens_in_cuda_graphs_as_eagerly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL_MOE))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(10, 31000, (n,), generator=g).tolist() for n in (9, 100, 260)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank, args=(port, str(tmp_path), prompts, results), nprocs=2, start_method="spawn")
        results = dict(results)
    assert results["captured_True"] and not results["captured_False"]
    assert len(results["True"]) == 3 and all(len(t) == 16 for t in results["True"])
    assert results["True"] == results["False"]
