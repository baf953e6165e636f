"""Streamed text deltas add up to the tokenizer's own decode of the whole output, and stop strings cut it,
however long the text grows (the detokenizer keeps only a bounded tail of what it already emitted)."""

from pathlib import Path

import pytest

from engine.detokenizer import Detokenizer
from engine.tokenizer_files import tokenizer_dir
from protocol.tokenizer import ChatTokenizer

TEXT = ("Disaggregated serving splits prefill from decode. Ünïcödé, 日本語のテキスト, emoji 🙂🚀 and spaces  "
        "  between words. ") * 12


@pytest.fixture(scope="module")
def tok(demo_gguf) -> ChatTokenizer:
    d = Path(tokenizer_dir(demo_gguf))
    return ChatTokenizer((d / "tokenizer.json").read_text(), {}, None)


def stream(tok: ChatTokenizer, ids: list[int], prompt: list[int], stop: tuple[str, ...] = (),
           include_stop: bool = False) -> tuple[str, bool]:
    d = Detokenizer(tok, prompt, stop, True, include_stop)
    out, stopped = [], False
    for i in ids:
        stopped = d.add(i)
        out.append(d.take_delta(final=stopped))
        if stopped:
            break
    if not stopped:
        out.append(d.take_delta(final=True))
    return "".join(out), stopped


def test_streamed_deltas_add_up_to_the_whole_decode(tok):
    prompt = tok.encode("Question: what is this?\nAnswer:", False)
    ids = tok.encode(TEXT, False)
    text, stopped = stream(tok, ids, prompt)
    assert not stopped
    assert text == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert len(text) > 1000  # long enough that the emitted text was trimmed many times


@pytest.mark.parametrize("include_stop", [False, True])
def test_a_stop_string_far_into_a_long_text_cuts_it(tok, include_stop):
    ids = tok.encode(TEXT + " The END of it. More words follow.", False)
    text, stopped = stream(tok, ids, [], stop=("END of",), include_stop=include_stop)
    assert stopped
    whole = tok.decode(ids)
    cut = whole.index("END of")
    assert text == whole[: cut + len("END of")] if include_stop else whole[:cut]


def test_a_stop_string_split_across_tokens_is_held_back_until_it_is_settled(tok):
    ids = tok.encode("alpha beta gamma", False)
    d = Detokenizer(tok, [], ("gamma delta",), True, False)
    deltas = []
    for i in ids:
        assert not d.add(i)
        deltas.append(d.take_delta(final=False))
    assert "".join(deltas) == "alpha beta "  # "gamma" could still begin the stop string
    assert d.take_delta(final=True) == "gamma"
