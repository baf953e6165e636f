"""Tensor- and expert-parallel workers: ranks as Ray CPU actors talking gloo give exactly the tokens of one
rank and of transformers (fp32, greedy), also with a prefill worker of another tp_size; a dead rank takes the
worker to unhealthy, fails what it was running, and a restart brings it back."""

import dataclasses
import json
import threading
import time

import httpx
import pytest
import ray

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.helpers import hf_greedy, make_tiny_model, write_tiny_tokenizer
from worker.config import WorkerConfig
from worker.ray_group import WorkerGroup

PROMPTS = [[(7 * i + 3 * j) % 290 + 1 for j in range(n)] for i, n in enumerate([5, 37, 70])]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (folder, transformers model)"""
    out = {}
    for kind in ("qwen2", "qwen3_moe", "mixtral", "llama"):
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = (folder, make_tiny_model(kind, folder, seed=3))
        write_tiny_tokenizer(folder)
    return out


def _config(folder, role: str, name: str, tp: int = 1, ep: int = 1, **over) -> WorkerConfig:
    from pdserve_cli.main import free_port

    engine = EngineConfig(model=str(folder), device="cpu", dtype="float32", kv_cache_bytes=4 << 20,
                          max_num_batched_tokens=64)
    return WorkerConfig(role=role, name=name, engine=engine, port=free_port(), tp_size=tp, ep_size=ep, **over)


def _generate(url: str, prompt: list[int], rid: str, max_tokens: int = MAX_TOKENS, prefill_url: str | None = None,
              adapter: str | None = None) -> tuple[list[int], list[dict]]:
    """A request as the router sends it: /generate to the decode worker and, when disaggregated, /prefill
    to the prefill worker at the same time."""
    params = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "adapter": adapter}
    prefill = None
    if prefill_url:
        body = {"request_id": rid, "prompt_token_ids": prompt, "params": params}
        prefill = threading.Thread(target=lambda: httpx.post(f"{prefill_url}/prefill", json=body, timeout=120))
        prefill.start()
    body = {"request_id": rid, "prompt_token_ids": prompt, "prefill_url": prefill_url, "params": params}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as r:
        chunks = [c for line in r.iter_lines() if line for c in json.loads(line)]  # a frame: a list of chunks
    if prefill is not None:
        prefill.join(60)
    return [t for c in chunks for t in c["token_ids"]], chunks


def _single_rank(folder) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu", kv_cache_bytes=4 << 20, max_num_batched_tokens=64))
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    return [r.token_ids for r in results]


@pytest.mark.parametrize(("kind", "tp", "ep"), [
    ("qwen2", 2, 1),  # dense
    ("qwen3_moe", 2, 1),  # experts' intermediate dimension split over tp
    ("qwen3_moe", 2, 2),  # four ranks: experts over ep, all-to-all dispatch
    ("mixtral", 1, 2),  # expert parallel alone; a vocabulary that does not split evenly
    ("mixtral", 2, 2),
    ("llama", 4, 1),  # 2 KV heads on 4 ranks: each KV head on two ranks
])
def test_parallel_worker_greedy_matches_one_rank_and_transformers(ray_local, models, kind, tp, ep):
    folder, hf_model = models[kind]
    group = WorkerGroup(_config(folder, "decode", f"{kind}-tp{tp}-ep{ep}", tp, ep))
    try:
        got = [_generate(group.url, p, f"r{i}")[0] for i, p in enumerate(PROMPTS)]
    finally:
        group.stop()
    expected = [hf_greedy(hf_model, p, MAX_TOKENS) for p in PROMPTS]
    assert got == expected
    assert got == _single_rank(folder)


def test_lora_adapters_on_two_tp_ranks_match_peft(ray_local, models, tmp_path):
    """Each rank holds its slices of the adapters; rank 0 refills its one slot as requests alternate between an
    adapter given at start and one loaded at run time, and the other rank follows: peft's greedy tokens."""
    from tests.helpers import LORA_TARGETS, write_lora_adapter

    folder, hf_model = models["llama"]
    refs = {None: hf_model, "a": write_lora_adapter(hf_model, tmp_path / "a", 8, seed=1, targets=LORA_TARGETS),
            "b": write_lora_adapter(hf_model, tmp_path / "b", 4, seed=2, targets=["q_proj", "o_proj", "down_proj"])}
    cfg = _config(folder, "decode", "lora-tp2", 2, loras=(("a", str(tmp_path / "a")),))
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, max_loras=1, max_lora_rank=8))
    group = WorkerGroup(cfg)
    try:
        loaded = httpx.post(f"{group.url}/adapters", json={"name": "b", "path": str(tmp_path / "b")}, timeout=60)
        assert loaded.status_code == 200 and set(loaded.json()["adapters"]) == {"a", "b"}
        order = ["a", "b", None, "a", "b"]
        got = [_generate(group.url, PROMPTS[i % 3], f"l{i}", adapter=name)[0] for i, name in enumerate(order)]
    finally:
        group.stop()
    assert got == [hf_greedy(refs[name], PROMPTS[i % 3], MAX_TOKENS) for i, name in enumerate(order)]


def test_sizes_that_do_not_split_fail_the_start_clearly_and_leave_no_actor(ray_local, models):
    folder, _ = models["qwen2"]  # 4 attention heads
    with pytest.raises(Exception, match="4 attention heads do not split over tp_size 3") as failed:
        WorkerGroup(_config(folder, "decode", "uneven", tp=3))
    # The traceback held here keeps the failed start's actor handles referenced: only an explicit stop
    # ends those actors (Ray would otherwise end them only once the handles are garbage-collected).
    deadline = time.monotonic() + 10
    while any(a["name"].startswith("uneven") for a in ray.util.list_named_actors(all_namespaces=True)):
        assert time.monotonic() < deadline, "a rank actor of the failed worker is still alive"
        time.sleep(0.2)
    assert failed.traceback


def test_prefill_tp1_feeds_decode_tp2_with_the_same_tokens(ray_local, models):
    folder, hf_model = models["qwen3_moe"]
    prefill = WorkerGroup(_config(folder, "prefill", "prefill-tp1"))
    decode = WorkerGroup(_config(folder, "decode", "decode-tp2", tp=2))
    try:
        got = [_generate(decode.url, p, f"d{i}", prefill_url=prefill.url)[0] for i, p in enumerate(PROMPTS)]
        sent = httpx.get(f"{prefill.url}/load").json()["kv_bytes_sent"]
    finally:
        prefill.stop()
        decode.stop()
    assert got == [hf_greedy(hf_model, p, MAX_TOKENS) for p in PROMPTS]
    assert sent > 0  # the KV did travel, each decode rank receiving its heads


def test_prefill_tp2_feeds_decode_tp1_with_the_same_tokens(ray_local, models):
    folder, hf_model = models["qwen2"]
    prefill = WorkerGroup(_config(folder, "prefill", "prefill-tp2", tp=2))
    decode = WorkerGroup(_config(folder, "decode", "decode-tp1"))
    try:
        got = [_generate(decode.url, p, f"e{i}", prefill_url=prefill.url)[0] for i, p in enumerate(PROMPTS)]
    finally:
        prefill.stop()
        decode.stop()
    assert got == [hf_greedy(hf_model, p, MAX_TOKENS) for p in PROMPTS]


def test_idle_parallel_worker_outlives_its_collective_timeout(ray_local, models):
    """The other ranks wait for rank 0's next step as long as the worker is idle, not one collective timeout."""
    folder, hf_model = models["qwen2"]
    group = WorkerGroup(_config(folder, "decode", "idle", tp=2, collective_timeout_s=2.0))
    try:
        time.sleep(5)
        assert httpx.get(f"{group.url}/health").status_code == 200
        assert _generate(group.url, PROMPTS[0], "late")[0] == hf_greedy(hf_model, PROMPTS[0], MAX_TOKENS)
    finally:
        group.stop()


def test_dead_rank_makes_worker_unhealthy_fails_requests_and_restart_recovers(ray_local, models):
    folder, hf_model = models["qwen2"]
    group = WorkerGroup(_config(folder, "decode", "doomed", tp=2))
    try:
        assert httpx.get(f"{group.url}/health").status_code == 200
        body = {"request_id": "long", "prompt_token_ids": PROMPTS[1],
                "params": {"max_tokens": 400, "temperature": 0, "ignore_eos": True}}
        with httpx.stream("POST", f"{group.url}/generate", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = json.loads(next(lines))[0]  # the request is running on both ranks
            ray.kill(group.actors[1])
            rest = [c for line in lines if line for c in json.loads(line)]
        tokens = first["token_ids"] + [t for c in rest for t in c["token_ids"]]
        assert len(tokens) < 400 and rest[-1]["finish_reason"] == "error"
        assert rest[-1]["error"]["code"] == "engine_failed"
        deadline = time.monotonic() + 30  # the watcher names the rank (gloo may have failed the step first;
        # Ray reports the dead actor within seconds, more on a loaded 2-core machine)
        while "rank 1" not in (health := httpx.get(f"{group.url}/health")).text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health.status_code == 503 and "rank 1 of worker doomed died" in health.json()["detail"]
        refused = httpx.post(f"{group.url}/generate", json={"request_id": "after", "prompt_token_ids": PROMPTS[0],
                                                             "params": {"max_tokens": 2}}, timeout=10)
        assert refused.status_code == 503 and "rank 1" in refused.json()["error"]["message"]

        group.restart()
        assert httpx.get(f"{group.url}/health").status_code == 200
        assert _generate(group.url, PROMPTS[0], "again")[0] == hf_greedy(hf_model, PROMPTS[0], MAX_TOKENS)
    finally:
        group.stop()


def test_gguf_model_is_dequantised_then_sliced_over_three_ranks(ray_local):
    """The demo GGUF (9 heads, 3 KV heads) on tp_size 3: the same greedy tokens as one rank."""
    from tests.helpers import demo_model_path

    config = _config(demo_model_path(), "decode", "gguf-tp3", tp=3)
    prompt = PROMPTS[1]
    engine = LLMEngine(EngineConfig(model=str(demo_model_path()), device="cpu", kv_cache_bytes=4 << 20))
    expected = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    del engine
    group = WorkerGroup(config)
    try:
        assert _generate(group.url, prompt, "g")[0] == expected[0].token_ids
    finally:
        group.stop()
