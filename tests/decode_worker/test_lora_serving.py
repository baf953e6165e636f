"""LoRA adapters through a real router and workers (issue 36): an adapter given at start (`--lora`) and one
loaded through the admin API are models of their own (listed with their base as `parent`, also reachable as
`base:adapter`); their answers, prefilled on the prefill worker and decoded on the decode worker, are the text of
transformers + peft's greedy tokens; a bad adapter is refused with the worker's reason, on every worker or none;
an unloaded adapter is the OpenAI 404."""

import httpx
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.helpers import LORA_TARGETS, hf_greedy, make_tiny_model, write_lora_adapter, write_tiny_tokenizer

ADMIN = "lora-admin"
PROMPT = [(7 * i + 3) % 290 + 5 for i in range(40)]  # 2 full blocks and a partial one: prefilled remotely
TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Llama with two adapters, 1 prefill + 1 decode worker serving adapter `a` from the start, and a
    router sending every prompt through the prefill worker; (router, folders, transformers models)."""
    from bench.cluster import LocalCluster

    root = tmp_path_factory.mktemp("lora-serving")
    base = make_tiny_model("llama", root / "base", seed=3)
    write_tiny_tokenizer(root / "base")
    models = {None: base, "a": write_lora_adapter(base, root / "a", 8, seed=1, targets=LORA_TARGETS),
              "b": write_lora_adapter(base, root / "b", 4, seed=2, targets=["q_proj", "v_proj", "down_proj"])}
    cluster = LocalCluster(str(root / "base"), prefill=1, decode=1, kv_cache_bytes=16 << 20, worker_args=(
        "--device", "cpu", "--max-loras", "2", "--max-lora-rank", "8", "--lora", f"a={root / 'a'}"))
    try:
        router = cluster.start_router("--local-prefill-tokens", "0", "--admin-token", ADMIN)
        yield router, root, models, cluster
    finally:
        cluster.close()


def _expected_text(root, models, name: str | None) -> str:
    """The text of transformers + peft's greedy tokens, as pdserve's engine detokenizes them."""
    engine = LLMEngine(EngineConfig(model=str(root / "base"), kv_cache_bytes=8 << 20, max_loras=1, max_lora_rank=8))
    if name is not None:
        engine.load_adapter(name, str(root / name))
    out = engine.generate([PROMPT], SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True,
                                                   adapter=name))[0]
    assert out.token_ids == hf_greedy(models[name], PROMPT, TOKENS)
    return out.text


def _complete(router: str, model: str) -> httpx.Response:
    return httpx.post(f"{router}/v1/completions", timeout=120, json={
        "model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True})


def test_an_adapter_given_at_start_is_a_model_with_its_own_answers(served):
    router, root, models, cluster = served
    listed = httpx.get(f"{router}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m.get("parent")) for m in listed] == [("base", None), ("a", "base")]
    texts = {name: _expected_text(root, models, name) for name in (None, "a")}
    assert texts["a"] != texts[None]
    computed = cluster.load(cluster.prefill_urls[0])["tokens_computed"]
    for model, name in (("base", None), ("a", "a"), ("base:a", "a")):
        r = _complete(router, model)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == texts[name], model
        assert r.json()["model"] == model
    # The prompt went through the prefill worker each time: the base's blocks do not serve the adapter's prompt
    # (the second `a` request reuses the first's).
    assert cluster.load(cluster.prefill_urls[0])["tokens_computed"] - computed >= 2 * len(PROMPT)
    assert httpx.get(f"{router}/v1/models/a", timeout=10).json()["parent"] == "base"


def test_the_admin_api_loads_and_unloads_adapters_on_every_worker(served, tmp_path):
    router, root, models, cluster = served
    admin = {"authorization": f"Bearer {ADMIN}"}
    bad = httpx.post(f"{router}/admin/adapters", json={"name": "c", "path": str(tmp_path / "none")}, headers=admin,
                     timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "adapter_load_failed"
    assert "adapter_config.json" in bad.json()["error"]["message"]
    loaded = httpx.post(f"{router}/admin/adapters", json={"name": "b", "path": str(root / "b")}, headers=admin,
                        timeout=30)
    assert loaded.status_code == 201, loaded.text
    assert sorted(loaded.json()["workers"]) == sorted(cluster.prefill_urls + cluster.decode_urls)
    for url in cluster.prefill_urls + cluster.decode_urls:
        assert set(cluster.load(url)["adapters"]) == {"a", "b"}
    r = _complete(router, "b")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == _expected_text(root, models, "b")
    listing = httpx.get(f"{router}/admin/adapters", headers=admin, timeout=10).json()["data"]
    assert [(x["name"], len(x["workers"])) for x in listing] == [("a", 2), ("b", 2)]
    assert httpx.delete(f"{router}/admin/adapters/b", headers=admin, timeout=30).status_code == 200
    gone = _complete(router, "b")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert httpx.delete(f"{router}/admin/adapters/b", headers=admin, timeout=30).status_code == 404
    assert httpx.post(f"{router}/admin/adapters", json={"name": "b", "path": str(root / "b")},
                      timeout=30).status_code == 401  # (the admin token)
