"""Sampling behaves as the OpenAI API says: seeds, stop strings, max_tokens, logprobs."""

import pytest
import torch

from engine.errors import RequestError
from engine.request import FinishReason
from engine.sampler import SamplingBatch, sample, uniform_noise
from engine.sampling_params import SamplingParams

CHAT = [{"role": "user", "content": "Tell me a short story about a robot."}]


def test_seeded_sampling_is_reproducible_whatever_the_batch(demo_engine):
    prompt = demo_engine.tokenizer.encode_chat(CHAT)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = demo_engine.generate([prompt], params)[0].token_ids
    other = SamplingParams(max_tokens=12, temperature=0.8, seed=7)
    batched = demo_engine.generate([prompt, prompt[:-3], prompt], [params, other, params])
    assert batched[0].token_ids == alone
    assert batched[2].token_ids == alone


def test_different_seeds_give_different_samples(demo_engine):
    prompt = demo_engine.tokenizer.encode_chat(CHAT)
    outs = {tuple(demo_engine.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=s))[0]
                  .token_ids) for s in range(4)}
    assert len(outs) > 1


def test_top_k_one_is_greedy(demo_engine):
    prompt = demo_engine.tokenizer.encode_chat(CHAT)
    greedy = demo_engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0].token_ids
    top1 = demo_engine.generate([prompt], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3))[0]
    assert top1.token_ids == greedy


def test_sampler_draws_follow_the_distribution():
    # Three tokens with probabilities 0.5, 0.3, 0.2; 4000 seeded draws land within a few percent.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    n = logits.shape[0]
    batch = SamplingBatch(
        temperature=torch.ones(n), top_k=torch.full((n,), 3), top_p=torch.ones(n), min_p=torch.zeros(n),
        presence=torch.zeros(n), frequency=torch.zeros(n), repetition=torch.ones(n),
        seeds=torch.arange(n, dtype=torch.int64) * 7919, steps=torch.zeros(n, dtype=torch.int64),
        output_counts=None, seen_tokens=None, num_logprobs=None, any_sampling=True, any_top_k_p=False,
        any_min_p=False)
    counts = torch.bincount(sample(logits, batch).token_ids, minlength=3).float() / n
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    u = uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), 1000)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.05


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.25, 0.1, 0.05]])).repeat(500, 1)
    n = logits.shape[0]
    batch = SamplingBatch(
        temperature=torch.ones(n), top_k=torch.full((n,), 4), top_p=torch.full((n,), 0.8), min_p=torch.zeros(n),
        presence=torch.zeros(n), frequency=torch.zeros(n), repetition=torch.ones(n),
        seeds=torch.arange(n, dtype=torch.int64), steps=torch.zeros(n, dtype=torch.int64), output_counts=None,
        seen_tokens=None, num_logprobs=None, any_sampling=True, any_top_k_p=True, any_min_p=False)
    tokens = set(sample(logits, batch).token_ids.tolist())
    assert tokens == {0, 1}


def test_max_tokens_ends_with_length(demo_engine):
    prompt = demo_engine.tokenizer.encode_chat(CHAT)
    res = demo_engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0))[0]
    assert len(res.token_ids) == 5 and res.finish_reason is FinishReason.LENGTH


def test_stop_string_cuts_text_and_stops(demo_engine):
    prompt = demo_engine.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    full = demo_engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
    assert "Paris" in full.text
    stop = "Paris"
    res = demo_engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))[0]
    assert res.finish_reason is FinishReason.STOP
    assert res.text == full.text[: full.text.index(stop)]
    assert len(res.token_ids) < len(full.token_ids)


def test_stop_token_id_ends_generation(demo_engine):
    prompt = demo_engine.tokenizer.encode_chat(CHAT)
    full = demo_engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
    res = demo_engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0,
                                                        stop_token_ids=(full.token_ids[2],)))[0]
    assert res.token_ids == full.token_ids[:3] and res.finish_reason is FinishReason.STOP


def test_logprobs_match_transformers(demo_engine, demo_hf):
    hf_model, _ = demo_hf
    prompt = demo_engine.tokenizer.encode_chat(CHAT)
    res = demo_engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, logprobs=3))[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + res.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    for i, lp in enumerate(res.logprobs):
        assert lp.token_id == res.token_ids[i]
        assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-4)
        top = ref[i].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_penalties_discourage_repeats(demo_engine):
    prompt = demo_engine.tokenizer.encode_chat([{"role": "user", "content": "Say 'la' twenty times."}])
    plain = demo_engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    penal = demo_engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                          frequency_penalty=2.0, presence_penalty=2.0))[0]
    assert len(set(penal.token_ids)) > len(set(plain.token_ids))


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=3.0), dict(top_p=0.0), dict(top_k=-1),
                                 dict(logprobs=21), dict(stop=("",)), dict(presence_penalty=5.0)])
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)


def test_bad_prompts_are_refused(demo_engine):
    with pytest.raises(RequestError, match="empty"):
        demo_engine.add_request("x", [], SamplingParams())
    with pytest.raises(RequestError, match="token ids"):
        demo_engine.add_request("y", [10**6], SamplingParams())
    with pytest.raises(RequestError, match="context"):
        demo_engine.add_request("z", [1] * 10_000, SamplingParams())


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(500, 1)
    n = logits.shape[0]
    batch = SamplingBatch(
        temperature=torch.ones(n), top_k=torch.full((n,), 4), top_p=torch.ones(n), min_p=torch.full((n,), 0.5),
        presence=torch.zeros(n), frequency=torch.zeros(n), repetition=torch.ones(n),
        seeds=torch.arange(n, dtype=torch.int64), steps=torch.zeros(n, dtype=torch.int64), output_counts=None,
        seen_tokens=None, num_logprobs=None, any_sampling=True, any_top_k_p=False, any_min_p=True)
    assert set(sample(logits, batch).token_ids.tolist()) == {0, 1}  # 0.15 and 0.05 are under 0.5 * 0.5


def _hf_prompt_logprobs(hf_model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)  # row i: the distribution of prompt[i + 1]


def _check_prompt_logprobs(got, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    assert [lp.token_id for lp in got] == prompt[1:]
    for i, lp in enumerate(got):
        assert lp.logprob == pytest.approx(ref[i, prompt[i + 1]].item(), abs=1e-4)
        top = ref[i].topk(k)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_prompt_logprobs_match_transformers(demo_gguf, demo_hf):
    """Each prompt token's logprob (after the first) and top alternatives, as transformers computes them: a long
    prompt prefilled in chunks, the same prompt again once its blocks are cached (computed anew, not read from
    the cache), and beside requests that ask for none, whose outputs are unchanged."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    hf_model, _ = demo_hf
    engine = LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=64 << 20, max_num_batched_tokens=48))
    long_chat = [{"role": "user", "content": "Tell me about lighthouses, " * 12}]
    prompts = [engine.tokenizer.encode_chat(CHAT), engine.tokenizer.encode_chat(long_chat)]
    assert len(prompts[1]) > 2 * 48  # three chunks or more
    plain = SamplingParams(max_tokens=4, temperature=0)
    asked = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2)
    alone = engine.generate(prompts, plain)
    results = engine.generate(prompts + prompts, [asked, asked, plain, plain])
    for prompt, res in zip(prompts, results[:2], strict=True):
        _check_prompt_logprobs(res.prompt_logprobs, prompt, _hf_prompt_logprobs(hf_model, prompt), 2)
    assert [r.token_ids for r in results] == [a.token_ids for a in alone] * 2
    assert results[2].prompt_logprobs is None and results[2].num_cached_tokens > 0
    assert results[0].num_cached_tokens == 0  # its prompt was computed, not read from the cache
