"""Overlapped scheduling (step N+1 queued before step N's tokens are read) changes no output: the same
tokens, logprobs and finish reasons as one step at a time, with stops, aborts, preemption and the prefix
cache in play, and no placeholder ever hashed into the prefix cache."""

import multiprocessing as mp
import socket

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from protocol.block_hash import hash_blocks
from tests.helpers import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", folder, seed=5)
    return folder


def _engine(model_dir, overlap: bool, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_bytes", 4 << 20)
    return LLMEngine(EngineConfig(model=str(model_dir), async_scheduling=overlap, **kw))


def _prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 250 + 2 for j in range(5 + 11 * i)] for i in range(n)]


def _params(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=20, temperature=0),
        SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, logprobs=3),
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_token]),  # stops mid-way
        SamplingParams(max_tokens=9, temperature=0.7, frequency_penalty=0.5, seed=1),  # no overlap for it
        SamplingParams(max_tokens=15, temperature=0, min_tokens=3, logprobs=1),
    ]


def _same(a, b) -> None:
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.finish_reason for r in a] == [r.finish_reason for r in b]
    assert [[(lp.token_id, lp.logprob, lp.top) for lp in r.logprobs] for r in a] == \
        [[(lp.token_id, lp.logprob, lp.top) for lp in r.logprobs] for r in b]


def test_overlapped_steps_give_the_same_outputs(model_dir):
    prompts = _prompts(6)
    probe = _engine(model_dir, False).generate(prompts[3:4], SamplingParams(max_tokens=20, temperature=0))[0]
    params = _params(stop_token=probe.token_ids[6])  # a token request 3 produces: it stops there
    plain_engine, overlapped_engine = _engine(model_dir, False), _engine(model_dir, True)
    plain = plain_engine.generate(prompts, params)
    overlapped = overlapped_engine.generate(prompts, params)
    _same(overlapped, plain)
    assert plain[3].finish_reason == FinishReason.STOP and len(plain[3].token_ids) == 7
    assert plain_engine.stats.num_overlapped_steps == 0
    # it did overlap, once the penalised request (9 tokens; its steps run one at a time) had ended
    assert overlapped_engine.stats.num_overlapped_steps >= 8
    assert overlapped_engine.block_pool.num_free_blocks == overlapped_engine.block_pool.num_blocks


def test_preemption_while_overlapping_gives_the_same_outputs(model_dir):
    prompts = _prompts(6)
    params = SamplingParams(max_tokens=24, temperature=0)
    roomy = _engine(model_dir, False).generate(prompts, params)
    probe = _engine(model_dir, True)
    tight = _engine(model_dir, True, kv_cache_bytes=9 * probe.kv_layout.block_bytes, enable_prefix_caching=False)
    _same(tight.generate(prompts, params), roomy)
    assert tight.stats.num_preemptions > 0 and tight.stats.num_overlapped_steps > 0
    assert tight.block_pool.num_free_blocks == tight.block_pool.num_blocks


def test_abort_while_a_step_is_in_flight(model_dir):
    prompts = _prompts(3)
    params = SamplingParams(max_tokens=16, temperature=0)
    want = _engine(model_dir, False).generate(prompts[1:], params)
    engine = _engine(model_dir, True, enable_prefix_caching=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    seen: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    for _ in range(4):
        for o in engine.step():
            seen[o.request_id] += o.new_token_ids
    assert engine._inflight is not None  # a step is queued whose tokens are not read
    out = engine.abort_request("r0")
    assert out.finished and out.finish_reason is FinishReason.ABORT
    aborted_at = list(seen["r0"])
    while engine.has_unfinished():
        for o in engine.step():
            seen[o.request_id] += o.new_token_ids
    assert seen["r0"] == aborted_at  # nothing after the abort
    assert [seen["r1"], seen["r2"]] == [r.token_ids for r in want]
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks


def test_prefix_cache_holds_only_hashes_of_known_tokens(model_dir):
    prompts = _prompts(4)
    params = SamplingParams(max_tokens=40, temperature=0)  # outputs cross several block boundaries
    plain_engine, engine = _engine(model_dir, False), _engine(model_dir, True)
    plain = plain_engine.generate(prompts, params)
    done = engine.generate(prompts, params)
    _same(done, plain)
    bs, root = engine.config.block_size, engine.root_hash
    real = {h for p, r in zip(prompts, done, strict=True) for h in hash_blocks(p + r.token_ids, bs, root)}
    cached = set(engine.block_pool.cached)
    assert cached <= real  # every cached block is a chain of real tokens (no placeholder inside)
    assert set(plain_engine.block_pool.cached) <= cached


def _tp_rank(rank: int, port: int, folder: str, prompts, out) -> None:
    from engine.parallel import ParallelConfig, init_parallel

    par = init_parallel(ParallelConfig(2, 1), rank, f"tcp://127.0.0.1:{port}", torch.device("cpu"))
    engine = LLMEngine(EngineConfig(model=folder, kv_cache_bytes=4 << 20, async_scheduling=True), parallel=par)
    if rank == 0:
        done = engine.generate(prompts, [SamplingParams(max_tokens=n, temperature=0) for n in (14, 3, 9)])
        engine.runner.stop_followers()
        out.put(([r.token_ids for r in done], engine.stats.num_overlapped_steps))
    else:
        engine.runner.follow()
    torch.distributed.destroy_process_group()


def test_overlapped_steps_over_two_tensor_parallel_ranks(model_dir):
    """Rank 0 queues step N+1 with placeholders before reading step N; the other rank fills them from rank
    0's samples, broadcast on the device: the tokens of one rank stepping one at a time."""
    prompts = _prompts(3)
    want = _engine(model_dir, False).generate(prompts, [SamplingParams(max_tokens=n, temperature=0)
                                                        for n in (14, 3, 9)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_tp_rank, args=(r, port, str(model_dir), prompts, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        tokens, overlapped = out.get(timeout=120)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert tokens == [r.token_ids for r in want]
    assert overlapped > 5


def test_a_request_ended_while_a_step_computes_it_keeps_its_blocks_until_that_step_is_read(model_dir):
    """Its blocks must not go to another request (whose KV another process may write) while the queued step
    still writes the token computed in vain."""
    engine = _engine(model_dir, True, enable_prefix_caching=False)
    probe = _engine(model_dir, False).generate(_prompts(2)[1:], SamplingParams(max_tokens=12, temperature=0))[0]
    engine.add_request("long", _prompts(1)[0], SamplingParams(max_tokens=30, temperature=0))
    engine.add_request("stops", _prompts(2)[1], SamplingParams(max_tokens=30, temperature=0,
                                                              stop_token_ids=[probe.token_ids[8]]))
    req = engine.scheduler.requests["stops"]
    ended = None
    while ended is None:
        blocks = list(req.block_ids)
        outs = engine.step()
        ended = next((o for o in outs if o.request_id == "stops" and o.finished), None)
    assert ended.finish_reason is FinishReason.STOP
    assert engine._inflight is not None and any(r is req for r in engine._inflight.batch.requests)
    assert all(engine.block_pool.ref_counts[b] > 0 for b in blocks)  # still held for the queued step
    engine.step()  # reads that step
    assert all(engine.block_pool.ref_counts[b] == 0 for b in blocks)
    while engine.has_unfinished():
        engine.step()
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks
