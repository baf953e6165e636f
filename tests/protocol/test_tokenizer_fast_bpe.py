"""The router's fast byte-level BPE (tiktoken built from tokenizer.json) gives tokenizers' ids exactly, or is
not used."""

import random

import pytest

from protocol.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def demo_tokenizer(demo_gguf):
    from engine.tokenizer_files import tokenizer_dir

    return ChatTokenizer.from_dir(tokenizer_dir(demo_gguf))


def _random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF),
              (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xACFF), (0x1F300, 0x1F6FF), (0x40000, 0x40100)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges[:1] * 8 + ranges)  # mostly ASCII, with every kind of character in it
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.15:
            out.append(rng.choice([" ", "  ", "\n", "\n\n", "\t", "'s", "'ll", "123", "<|im_start|>", "<|im_end|>"]))
    return "".join(out)


def test_fast_bpe_gives_tokenizers_ids_on_random_and_real_text(demo_tokenizer):
    tok = demo_tokenizer
    assert tok.fast_bpe is not None  # SmolLM2: byte-level BPE (with bytes its vocabulary lacks)
    assert tok.fast_bpe[1] is None  # its ids grow in merge order: tiktoken's ranks are its ids, no mapping
    rng = random.Random(0)
    texts = [_random_text(rng, rng.randint(1, 600)) for _ in range(300)]
    from bench.workloads import read_sharegpt

    for conv in read_sharegpt(limit=150):
        texts.append(tok.render_chat([{"role": "user" if t.get("from") == "human" else "assistant",
                                       "content": t.get("value") or ""} for t in conv]))
    got = tok.encode_batch(texts, add_special_tokens=False)
    for text, ids in zip(texts, got, strict=True):
        assert ids == tok.encode(text, add_special_tokens=False), text[:200]


def test_tokenizers_it_cannot_mirror_keep_tokenizers():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    corpus = ["hello world", "héllo there", "the world says hello"] * 20
    for setup in ("metaspace", "normalizer"):
        inner = Tokenizer(models.BPE())
        if setup == "metaspace":  # SentencePiece-style: not byte-level
            inner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        else:  # byte-level, but text is normalized first (NFKC): tiktoken would not do that
            inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            inner.normalizer = normalizers.NFKC()
        inner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=(
            pre_tokenizers.ByteLevel.alphabet() if setup == "normalizer" else [])))
        tok = ChatTokenizer(inner.to_str(), {})
        assert tok.fast_bpe is None
        assert tok.encode_batch(["héllo world"], False) == [tok.encode("héllo world", add_special_tokens=False)]


def _byte_level_bpe(rng: random.Random, vocab_size: int) -> str:
    """tokenizer.json of a byte-level BPE trained on random text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [_random_text(rng, 200) for _ in range(200)]
    inner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return inner.to_str()


def test_a_plain_byte_level_bpe_is_mirrored_exactly():
    rng = random.Random(3)
    tok = ChatTokenizer(_byte_level_bpe(rng, 800), {})
    assert tok.fast_bpe is not None
    texts = [_random_text(rng, 300) for _ in range(100)]
    assert tok.encode_batch(texts, False) == [tok.encode(t, add_special_tokens=False) for t in texts]


def test_ids_out_of_merge_order_are_mapped_from_ranks():
    import json

    rng = random.Random(4)
    spec = json.loads(_byte_level_bpe(rng, 600))
    vocab = spec["model"]["vocab"]
    shuffled = list(vocab.values())
    rng.shuffle(shuffled)  # the same tokens and merges, ids in no order
    spec["model"]["vocab"] = dict(zip(vocab, shuffled, strict=True))
    tok = ChatTokenizer(json.dumps(spec), {})
    assert tok.fast_bpe is not None and tok.fast_bpe[1] is not None
    texts = [_random_text(rng, 300) for _ in range(100)]
    assert tok.encode_batch(texts, False) == [tok.encode(t, add_special_tokens=False) for t in texts]


def test_the_fast_path_can_be_switched_off(demo_gguf, monkeypatch):
    from engine.tokenizer_files import tokenizer_dir

    assert ChatTokenizer.from_dir(tokenizer_dir(demo_gguf), use_fast=False).fast_bpe is None
    monkeypatch.setenv("PDSERVE_FAST_TOKENIZER", "0")
    assert ChatTokenizer.from_dir(tokenizer_dir(demo_gguf)).fast_bpe is None



def test_the_search_for_bytes_a_vocabulary_lacks_finds_exactly_the_characters_holding_them():
    """Every code point (surrogates too), each byte alone: the text-level search matches a character exactly
    where the byte is in its UTF-8 encoding; with a continuation byte missing, the encoding is searched."""
    from protocol.tokenizer import _chars_with_bytes

    every = "".join(map(chr, range(0x110000)))
    holding: dict[int, set[str]] = {}
    for c in every:
        for b in c.encode("utf-8", "surrogatepass"):
            holding.setdefault(b, set()).add(c)
    for b in range(256):
        search = _chars_with_bytes(bytes([b]))
        if 0x80 <= b <= 0xBF:
            assert isinstance(search.pattern.pattern, bytes)
            assert search.search("é") == (b in "é".encode())
            continue
        found = set(search.ascii_chars) | (set(search.pattern.findall(every)) if search.pattern else set())
        assert found == holding.get(b, set()), hex(b)
    several = _chars_with_bytes(b"\x04\x1d\xc0\xc1\xf1\xf5\xff")  # SmolLM2 lacks these, and more
    assert {c for c in every if several.search(c)} == holding[0x04] | holding[0x1D] | holding[0xF1]


def test_an_ascii_text_is_searched_for_lacking_bytes_without_the_regex_and_the_same():
    """ASCII texts are answered by `in` alone (the regex class, with non-ASCII ranges, took ~19 us a 1.6 KB
    prompt): right both ways, and a non-ASCII text still goes through the regex."""
    from protocol.tokenizer import _chars_with_bytes

    search = _chars_with_bytes(b"\x04\x1d\xc0\xc1\xf1\xf5\xff")
    prompt = "a plain prompt " * 100
    assert search.search(prompt) is False
    assert search.search(prompt + "\x1d") is True
    assert search.search(prompt + "é") is False
    assert search.search(prompt + "é" + chr(0x40000)) is True  # 0xF1 leads U+40000-U+7FFFF

    class Unused:
        pattern = ""

        def search(self, text):
            raise AssertionError("the regex searched an ASCII text")

    search.pattern = Unused()
    assert search.search(prompt) is False and search.search("x\x04") is True
