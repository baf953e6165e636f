"""The router tokenizes off its event loop in batches; the ids must be exactly those of plain `encode`."""

import asyncio
import random

import pytest

from protocol.tokenizer import ChatTokenizer
from router.tokenize import BatchEncoder


@pytest.mark.parametrize("parallel", [False, True], ids=["batches_through_tiktoken", "batches_off_the_gil"])
async def test_batched_ids_equal_plain_encode_for_concurrent_prompts(demo_gguf, parallel):
    from engine.tokenizer_files import tokenizer_dir

    tok = ChatTokenizer.from_dir(tokenizer_dir(demo_gguf))
    assert tok.fast_bpe is not None
    batches = []
    encode_batch = tok.encode_batch

    def spy(texts, add_special_tokens=True, parallel=False, plain=False):
        batches.append(parallel)
        return encode_batch(texts, add_special_tokens, parallel, plain)

    tok.encode_batch = spy
    enc = BatchEncoder(tok, max_batch=8, parallel=parallel)
    rng = random.Random(0)
    words = ["héllo", "world", "<|im_start|>", "\n", "  ", "12345", "naïve", "🙂", "the", "token", "<|im_end|>"]
    texts = [tok.render_chat([{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 400)))}])
             for _ in range(40)]
    got = await asyncio.gather(*(enc.encode(t) for t in texts))  # several batches, some texts inline
    assert got == [tok.encode(t, add_special_tokens=False) for t in texts]
    assert (True in batches) is parallel and len(batches) > 2  # inline calls, then batches in the thread
    enc.close()


async def test_a_resent_chat_tokenizes_only_its_new_parts_with_the_same_ids(demo_gguf):
    from engine.tokenizer_files import tokenizer_dir

    tok = ChatTokenizer.from_dir(tokenizer_dir(demo_gguf))
    assert tok.splits_exactly
    rng = random.Random(1)
    words = ["héllo", "world", "\n", "  ", "12345", "naïve", "🙂", "the", "<|im_end|>", "token"]
    system = {"role": "system", "content": " ".join(rng.choice(words) for _ in range(300))}
    for cache_chars in (1 << 20, 300):  # roomy, and so small that parts are evicted all the time
        enc = BatchEncoder(tok, max_batch=4, cache_chars=cache_chars)
        chat = [system]
        for turn in range(6):
            chat.append({"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))})
            text = tok.render_chat(chat)
            assert await enc.encode(text) == tok.encode(text, add_special_tokens=False)
            chat.append({"role": "assistant", "content": f" answer {turn}\n"})
        concurrent = [tok.render_chat([system, {"role": "user", "content": f"question {i}"}]) for i in range(12)]
        got = await asyncio.gather(*(enc.encode(t) for t in concurrent))
        assert got == [tok.encode(t, add_special_tokens=False) for t in concurrent]
        if cache_chars > 1000:
            assert enc.parts_hit > enc.parts_missed  # the system prompt and earlier turns came from the cache
        assert enc._cached_chars <= cache_chars
        enc.close()


async def test_cached_prompt_parts_leave_the_cycle_collectors_view_after_one_collection(demo_gguf):
    import gc

    from engine.tokenizer_files import tokenizer_dir

    tok = ChatTokenizer.from_dir(tokenizer_dir(demo_gguf))
    enc = BatchEncoder(tok)
    for i in range(20):
        text = tok.render_chat([{"role": "system", "content": f"policy {i} " * 50}, {"role": "user", "content": "hi"}])
        assert await enc.encode(text) == tok.encode(text, add_special_tokens=False)
    assert enc._parts
    gc.collect()
    # Full collections come every few seconds under load; a cache of millions of ids must not be walked by each.
    assert not any(gc.is_tracked(ids) for ids in enc._parts.values())
    enc.close()


def test_a_tokenizer_whose_parts_do_not_tokenize_alone_is_not_split():
    """SentencePiece-style prefix space only at the start of the text: parts tokenized alone would each get
    it, so the encoder tokenizes whole prompts (and still gives plain encode's ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator(["Hello world, two spaces and héllo naïve text 12345"] * 50,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    chat_tok = ChatTokenizer(tok.to_str(), {})
    assert not chat_tok.splits_exactly and chat_tok.split_special("<s>Hello</s>") is None
    enc = BatchEncoder(chat_tok)
    text = "<s>Hello world</s><s> two spaces</s>"
    assert asyncio.run(enc.encode(text)) == chat_tok.encode(text, add_special_tokens=False)
    enc.close()


@pytest.mark.parametrize("cache_chars", [0, 1 << 20], ids=["without_the_parts_cache", "with_it"])
async def test_a_chat_encoded_from_its_skeletons_parts_has_the_ids_of_its_rendered_text(demo_gguf, cache_chars):
    from engine.tokenizer_files import tokenizer_dir

    tok = ChatTokenizer.from_dir(tokenizer_dir(demo_gguf))
    enc = BatchEncoder(tok, cache_chars=cache_chars)
    rng = random.Random(1)
    words = ["héllo", "world", "\n", "  ", "12345", "naïve", "🙂", "the", "token", "\x04"]
    for _ in range(20):
        chat = [{"role": "system", "content": "Be brief."}, *[
            {"role": role, "content": " ".join(rng.choice(words) for _ in range(rng.randint(0, 200)))}
            for role in ("user", "assistant", "user")[: rng.randint(1, 3)]]]
        parts = tok.render_chat_parts(chat)
        assert parts is not None
        assert await enc.encode_parts(parts) == tok.encode(tok.render_chat(chat), add_special_tokens=False)
    enc.close()
