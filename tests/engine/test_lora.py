"""Multi-LoRA in the engine (issue 36): PEFT adapters written here by `peft` on a small random Llama; greedy tokens
equal transformers + peft's (the adapter applied, fp32) with both adapters and the base model in one batch;
more adapters than device slots take turns; prefixes are not shared across adapters; an unloaded adapter's
running request finishes with it; bad adapters are refused with the reason."""

import json

import pytest

from engine.config import EngineConfig
from engine.errors import RequestError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.helpers import LORA_TARGETS, hf_greedy, make_tiny_model, write_lora_adapter

PROMPTS = [[(7 * i + 3 * j) % 290 + 1 for j in range(n)] for i, n in enumerate([5, 37, 70, 20])]
TOKENS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The base model and two adapters: rank 8 on every projection, rank 4 (rsLoRA) on attention only."""
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_model("llama", root / "base", seed=3)
    a = write_lora_adapter(base, root / "a", 8, seed=1, targets=LORA_TARGETS)
    b = write_lora_adapter(base, root / "b", 4, seed=2, targets=["q_proj", "v_proj", "o_proj"], rslora=True)
    return root, {None: base, "a": a, "b": b}


def _engine(root, **kw) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=str(root / "base"), kv_cache_bytes=8 << 20, max_num_batched_tokens=64,
                                    max_lora_rank=8, **{"max_loras": 2, **kw}))
    engine.load_adapter("a", str(root / "a"))
    engine.load_adapter("b", str(root / "b"))
    return engine


def _params(adapter: str | None) -> SamplingParams:
    return SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True, adapter=adapter)


def test_adapters_and_the_base_in_one_batch_match_transformers_and_peft(tiny):
    root, hf = tiny
    engine = _engine(root)
    expected = {name: [hf_greedy(model, p, TOKENS) for p in PROMPTS] for name, model in hf.items()}
    assert expected["a"] != expected[None] and expected["b"] != expected[None]  # each adapter changes the output
    names = [None, "a", "b"]
    mixed = [names[(i + j) % 3] for i in range(len(PROMPTS)) for j in range(3)]  # every prompt under each
    prompts = [PROMPTS[i] for i in range(len(PROMPTS)) for _ in range(3)]
    got = engine.generate(prompts, [_params(n) for n in mixed])
    for prompt, name, c in zip(prompts, mixed, got, strict=True):
        assert c.token_ids == expected[name][PROMPTS.index(prompt)], (name, PROMPTS.index(prompt))
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks


def test_more_adapters_than_slots_take_turns(tiny):
    """One device slot, two adapters and the base queued together: the base runs beside either adapter, the
    adapters run one after the other, and every output is still its own."""
    root, hf = tiny
    engine = _engine(root, max_loras=1)
    prompts = PROMPTS[:3] * 2
    names = ["a", "b", None, "b", "a", None]
    got = engine.generate(prompts, [_params(n) for n in names])
    for prompt, name, c in zip(prompts, names, got, strict=True):
        assert c.token_ids == hf_greedy(hf[name], prompt, TOKENS), name
    assert engine.adapters.refs == [0]


def test_prefixes_are_not_shared_across_adapters(tiny):
    root, _ = tiny
    engine = _engine(root)
    prompt = PROMPTS[2]  # 70 tokens: four full blocks
    first = engine.generate([prompt], _params("a"))[0]
    assert first.num_cached_tokens == 0
    for name in ("b", None):
        assert engine.generate([prompt], _params(name))[0].num_cached_tokens == 0, name
    again = engine.generate([prompt], _params("a"))[0]
    assert again.num_cached_tokens == 64 and again.token_ids == first.token_ids


def test_unloading_lets_a_running_request_finish_and_refuses_new_ones(tiny):
    root, hf = tiny
    engine = _engine(root)
    engine.add_request("running", PROMPTS[1], _params("a"))
    engine.step()
    engine.unload_adapter("a")
    assert engine.adapter_names() == ["b"]
    with pytest.raises(RequestError, match="no adapter 'a'"):
        engine.add_request("late", PROMPTS[0], _params("a"))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert tokens == hf_greedy(hf["a"], PROMPTS[1], TOKENS)


def test_bad_adapters_are_refused_with_the_reason(tiny, tmp_path):
    root, hf = tiny
    engine = _engine(root)
    with pytest.raises(RequestError, match="rank 8; this worker serves ranks up to 4"):
        LLMEngine(EngineConfig(model=str(root / "base"), kv_cache_bytes=8 << 20, max_loras=1,
                               max_lora_rank=4)).load_adapter("a", str(root / "a"))
    with pytest.raises(RequestError, match="adapter_config.json"):
        engine.load_adapter("missing", str(tmp_path / "nothing"))
    bias = tmp_path / "bias"
    bias.mkdir()
    config = json.loads((root / "a" / "adapter_config.json").read_text())
    (bias / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(RequestError, match="trained biases"):
        engine.load_adapter("bias", str(bias))
    with pytest.raises(RequestError, match="no adapter 'nope'"):
        engine.add_request("x", PROMPTS[0], _params("nope"))
    with pytest.raises(RequestError, match="serves no LoRA adapters"):
        LLMEngine(EngineConfig(model=str(root / "base"), kv_cache_bytes=8 << 20)).add_request(
            "x", PROMPTS[0], _params("a"))
