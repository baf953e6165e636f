"""bench.routing_quality's accounts: why prompt blocks were recomputed, and repeated runs summed up."""

import json

from bench.mock_server import BlockCache
from bench.router_overhead import _demo_tokenizer
from bench.routing_quality import miss_breakdown


def _demo_tokenizer_files() -> dict[str, str]:
    return {f.name: f.read_text() for f in _demo_tokenizer().iterdir() if f.is_file()}


def test_misses_are_told_apart_as_first_seen_held_elsewhere_or_evicted_everywhere():
    a, b, c, d, e, f, g = range(1, 8)
    served = [  # per worker: (time, blocks hit, block hashes); each worker's LRU holds 2 blocks
        [(1, 0, [a, b]), (3, 0, [d, e]), (5, 0, [a])],
        [(2, 0, [a, b, c]), (4, 0, [f, g]), (6, 1, [f])],
    ]
    shares = miss_breakdown(served, capacity=2)
    # t=1: a, b new. t=2: a, b on worker 0 (routing misses), c new. t=3, t=4: d, e, f, g new; worker 0 drops a, b
    # and worker 1 (which dropped c, the tail, at t=2) drops a, b. t=5: a is nowhere any more (evicted). t=6: f hit.
    assert shares == {k: round(v / 11, 5) for k, v in
                      {"hit": 1, "first_seen": 7, "elsewhere": 2, "evicted": 1}.items()}


def test_the_mock_logs_each_request_with_the_hits_it_counted():
    cache = BlockCache(capacity=100, root=7, tokenizer_files=_demo_tokenizer_files())
    ids = list(range(40))  # two full blocks and a partial one
    cache.serve({"prompt_token_ids": ids})
    cache.serve({"prompt_token_ids": ids[:32] + [99] * 8})
    (t1, hits1, hashes1), (t2, hits2, hashes2) = cache.served
    assert t1 <= t2
    assert (hits1, hits2) == (0, 2)
    assert hashes1 == hashes2 and len(hashes1) == 2
    assert cache.hit_tokens == 32


def test_the_mock_evicts_a_prompts_tail_first_so_what_stays_is_a_usable_prefix():
    cache = BlockCache(capacity=2, root=7, tokenizer_files=_demo_tokenizer_files())
    ids = list(range(48))  # three blocks, one more than the cache holds
    assert cache.serve({"prompt_token_ids": ids}) == 48
    assert cache.serve({"prompt_token_ids": ids}) == 16  # the first two blocks stayed: only the third is computed


def test_repeated_runs_are_summed_up_as_medians_and_paired_wins(capsys):
    from bench.routing_quality import summarize

    def run(ratio: float, imbalance: float) -> dict:
        return {"ratio": ratio, "load_imbalance": imbalance}

    runs = {"pdserve cache_aware": [run(0.985, 1.08), run(0.982, 1.09), run(0.987, 1.10), run(0.990, 1.07)],
            "sglang-router cache_aware": [run(0.980, 1.30), run(0.986, 1.20), run(0.984, 1.05), run(0.983, 1.15)]}
    summarize(runs, concurrency=64)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ours, theirs = rows
    assert (ours["router"], ours["value"], ours["ratio_min"], ours["load_imbalance_median"]) == (
        "pdserve cache_aware", 0.986, 0.982, 1.085)
    assert "pairs" not in ours
    # Pairs 1 and 4: higher at a lower imbalance; pair 2: lower; pair 3: higher, but at a higher imbalance.
    assert (theirs["pdserve_higher"], theirs["pdserve_higher_at_lower_or_equal_imbalance"], theirs["pairs"]) == (3, 2, 4)
    assert theirs["value"] == 0.9835 and theirs["load_imbalance_max"] == 1.3


def test_arrival_order_interleaves_one_shots_and_chats_all_through_the_trace_keeping_each_chats_turns_in_order():
    from bench.routing_quality import arrivals, trace

    sessions = trace(tenants=10, users=3, turns=4, one_shots=200, seed=0)
    every = sorted((i, k) for i, s in enumerate(sessions) for k in range(len(s)))
    for order in ("arrivals", "rounds"):
        sent = arrivals(sessions, order, seed=0)
        assert sorted(sent) == every  # each request once
        for i, s in enumerate(sessions):
            assert [k for j, k in sent if j == i] == list(range(len(s)))  # a chat's turns in order
    one_shot = {i for i, s in enumerate(sessions) if len(s) == 1}
    quarter = len(every) // 4

    def one_shots_in_last_quarter(order: str) -> float:
        return sum(i in one_shot for i, _ in arrivals(sessions, order, seed=0)[-quarter:]) / len(one_shot)

    assert one_shots_in_last_quarter("rounds") == 0  # all came in the first round, with every chat's first turn
    assert 0.15 < one_shots_in_last_quarter("arrivals") < 0.35  # about a quarter: they arrive all along


def test_each_seed_is_a_different_trace_of_the_same_shape():
    from bench.routing_quality import arrivals, trace

    zero, one = trace(3, 2, 2, 4, seed=0), trace(3, 2, 2, 4, seed=1)
    assert zero != one
    assert sorted(len(s) for s in zero) == sorted(len(s) for s in one)
    assert trace(3, 2, 2, 4, seed=1) == one  # a seed is one trace, every time
    assert arrivals(zero, "arrivals", seed=0) != arrivals(zero, "arrivals", seed=1)
