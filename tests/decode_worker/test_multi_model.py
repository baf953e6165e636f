"""Two models behind one router (issue 36): workers register under their model's name and the router serves
each model from its own workers, with its own tokenizer, prefix index root and routing: `/v1/models` lists
both, `/tokenize` and answers use the model's tokenizer, a model's prompts never reach the other's workers (the
one with a prefill pool prefills there, the other on its decode worker), and an unknown model is the OpenAI
404."""

import httpx
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.helpers import make_tiny_model, write_tiny_tokenizer

MODELS = {"tiny-llama": ("llama", 300), "tiny-qwen": ("qwen2", 320)}  # name: (kind, tokenizer vocabulary)
TEXT = "the quick brown fox moves kv blocks over the lazy dog"
TOKENS = 10


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, (kind, vocab) in MODELS.items():
        out[name] = tmp_path_factory.mktemp(name)
        make_tiny_model(kind, out[name], seed=5)
        write_tiny_tokenizer(out[name], vocab_size=vocab)
    return out


@pytest.fixture(scope="module")
def two_models(folders):
    """tiny-llama: one prefill and one decode worker; tiny-qwen: one decode worker; one router in front."""
    from bench.cluster import LocalCluster

    clusters = []
    try:
        for name, prefill in (("tiny-llama", 1), ("tiny-qwen", 0)):
            clusters.append(LocalCluster(str(folders[name]), prefill=prefill, decode=1, kv_cache_bytes=8 << 20,
                                         worker_args=("--device", "cpu", "--served-model-name", name)))
        front = LocalCluster.in_front_of([u for c in clusters for u in c.decode_urls],
                                         [u for c in clusters for u in c.prefill_urls])
        clusters.append(front)
        router = front.start_router("--local-prefill-tokens", "0")
        yield router, folders, {name: c for name, c in zip(MODELS, clusters, strict=False)}
    finally:
        for c in clusters:
            c.close()


def _reference(folder, prompt: str) -> tuple[list[int], str]:
    """The model's own engine: its tokenizer's ids for the prompt and its greedy text."""
    engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_bytes=8 << 20))
    out = engine.generate([prompt], SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True))[0]
    return engine.tokenizer.encode(prompt), out.text


def test_each_model_answers_with_its_own_tokenizer_and_workers(two_models):
    router, folders, clusters = two_models
    listed = [m["id"] for m in httpx.get(f"{router}/v1/models", timeout=10).json()["data"]]
    assert sorted(listed) == sorted(MODELS)
    refs = {name: _reference(folders[name], TEXT) for name in MODELS}
    assert refs["tiny-llama"][0] != refs["tiny-qwen"][0]  # the two tokenizers differ on this text
    before = {url: clusters[n].load(url)["tokens_computed"] for n in MODELS
              for url in clusters[n].prefill_urls + clusters[n].decode_urls}
    for name in MODELS:
        ids = httpx.post(f"{router}/tokenize", json={"model": name, "prompt": TEXT}, timeout=10).json()["tokens"]
        assert ids == refs[name][0], name
        r = httpx.post(f"{router}/v1/completions", timeout=120, json={
            "model": name, "prompt": TEXT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name and r.json()["choices"][0]["text"] == refs[name][1], name
    after = {url: clusters[n].load(url)["tokens_computed"] for n in MODELS
             for url in clusters[n].prefill_urls + clusters[n].decode_urls}
    llama, qwen = clusters["tiny-llama"], clusters["tiny-qwen"]
    # Each prompt was computed by its own model's workers only: tiny-llama's on its prefill worker (its decode
    # worker only decoded), tiny-qwen's on its decode worker (no prefill worker of its own).
    prompt = {name: len(refs[name][0]) for name in MODELS}
    assert after[llama.prefill_urls[0]] - before[llama.prefill_urls[0]] == prompt["tiny-llama"]
    assert after[llama.decode_urls[0]] - before[llama.decode_urls[0]] == TOKENS - 1
    assert after[qwen.decode_urls[0]] - before[qwen.decode_urls[0]] == prompt["tiny-qwen"] + TOKENS - 1


def test_an_unknown_model_is_the_openai_404_naming_the_models_served(two_models):
    router, _, _ = two_models
    r = httpx.post(f"{router}/v1/completions", json={"model": "gpt-9", "prompt": "hi", "max_tokens": 2}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "'tiny-llama'" in r.json()["error"]["message"] and "'tiny-qwen'" in r.json()["error"]["message"]
    assert httpx.get(f"{router}/v1/models/tiny-qwen", timeout=10).json()["id"] == "tiny-qwen"


@pytest.mark.slow
def test_pdserve_serve_takes_several_models_with_their_own_pools(folders):
    from bench.cluster import embedded_cluster

    flags = [f for name in MODELS for f in ("--model", str(folders[name]), "--served-model-name", name)]
    with embedded_cluster(*flags, "--prefill-workers", "0", "--decode-workers", "1,1", "--device", "cpu",
                          kv_cache_bytes=8 << 20) as (url, _):
        assert sorted(m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]) == sorted(MODELS)
        for name in MODELS:
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": name, "prompt": TEXT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == _reference(folders[name], TEXT)[1]
