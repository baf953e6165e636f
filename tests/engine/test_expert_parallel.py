"""Expert parallelism alone (two gloo processes): a sparse MoE block split over two ep ranks gives the one-rank
block's output, through the fixed-size exchange (decode) and the exact-size one (prefill) alike."""

import multiprocessing as mp
import socket

import pytest
import torch

from engine.model_config import ModelConfig
from engine.parallel import SINGLE

CFG = dict(model_type="qwen3_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
           num_experts_per_tok=3, norm_topk_prob=True, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, vocab_size=64)


def _block(par):
    from engine.moe import SparseMoE

    torch.manual_seed(0)
    full = SparseMoE(ModelConfig.from_hf_dict(CFG), SINGLE)
    for p in full.parameters():
        p.data.normal_(0, 0.3)
    if par is None:
        return full
    block = SparseMoE(ModelConfig.from_hf_dict(CFG), par)
    first, n = block.first_expert, block.num_local_experts
    block.gate.weight.data.copy_(full.gate.weight.data)
    block.w13.data.copy_(full.w13.data[first : first + n])
    block.w2.data.copy_(full.w2.data[first : first + n])
    return block


def _rank(rank: int, port: int, tokens: int, fixed_rows: int, out) -> None:
    import engine.moe
    from engine.parallel import ParallelConfig, init_parallel

    engine.moe.FIXED_EXCHANGE_ROWS = fixed_rows
    par = init_parallel(ParallelConfig(1, 2), rank, f"tcp://127.0.0.1:{port}", torch.device("cpu"))
    x = torch.randn(tokens, CFG["hidden_size"], generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        got = _block(par)(x)
    if rank == 0:
        out.put(got)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("exchange", ["fixed", "sized"])
def test_two_ep_ranks_give_the_one_rank_output(tokens, exchange):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    fixed_rows = 1 << 20 if exchange == "fixed" else 0
    procs = [ctx.Process(target=_rank, args=(r, port, tokens, fixed_rows, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = out.get(timeout=120)
    for p in procs:
        p.join(30)
    x = torch.randn(tokens, CFG["hidden_size"], generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        expected = _block(None)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
