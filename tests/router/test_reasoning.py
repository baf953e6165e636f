"""Reasoning parsers on outputs written as DeepSeek-R1 and Qwen3 write them: reasoning and answer read whole,
and the same read from a stream however the text is cut into deltas."""

import random

import pytest

from router.reasoning import REASONING_PARSERS, get_reasoning_parser

# (parser, output, expected reasoning_content, expected content)
CASES = {
    "r1_with_opening_tag": (
        "deepseek_r1",
        "<think>\nThe user asks for 17 * 23. 17 * 20 = 340, 17 * 3 = 51, so 391.\n</think>\n\n17 × 23 = **391**.",
        "The user asks for 17 * 23. 17 * 20 = 340, 17 * 3 = 51, so 391.", "17 × 23 = **391**."),
    "r1_opened_in_prompt": (
        "deepseek_r1",
        "Okay, so I need to find the capital of Australia. It's Canberra, not Sydney.\n</think>\n\n"
        "The capital of Australia is **Canberra**.",
        "Okay, so I need to find the capital of Australia. It's Canberra, not Sydney.",
        "The capital of Australia is **Canberra**."),
    "r1_cut_off_while_thinking": (
        "deepseek_r1", "Okay, let me work through this. First, the integral of x² is x³/3, then",
        "Okay, let me work through this. First, the integral of x² is x³/3, then", None),
    "r1_empty_reasoning": ("deepseek_r1", "<think>\n\n</think>\n\nHello! How can I help?", None,
                           "Hello! How can I help?"),
    "r1_mentions_think_in_answer": (
        "deepseek_r1", "Short one.</think>Tags like <think> and </think> mark reasoning.",
        "Short one.", "Tags like <think> and </think> mark reasoning."),
    "qwen3_thinking": (
        "qwen3",
        "<think>\nOkay, the user wants a haiku about autumn. 5-7-5 syllables.\n</think>\n\n"
        "Crimson leaves drifting,\nquiet wind through empty boughs—\nthe year exhales slow.",
        "Okay, the user wants a haiku about autumn. 5-7-5 syllables.",
        "Crimson leaves drifting,\nquiet wind through empty boughs—\nthe year exhales slow."),
    "qwen3_thinking_off": ("qwen3", "Paris is the capital of France.", None, "Paris is the capital of France."),
    "qwen3_no_opening_tag_is_all_content": (
        "qwen3", "I think so.\n</think>\n\nYes.", None, "I think so.\n</think>\n\nYes."),
    "qwen3_cut_off_while_thinking": ("qwen3", "<think>\nLet me count the r's in strawberry: s-t-r",
                                     "Let me count the r's in strawberry: s-t-r", None),
    "qwen3_then_tool_call": (
        "qwen3",
        '<think>\nI should call get_weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call>',
        "I should call get_weather.",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    "qwen3_starts_like_a_tag": ("qwen3", "<thinking> is not the tag.", None, "<thinking> is not the tag."),
    "empty_output": ("qwen3", "", None, None),
}


def _cuts(text: str) -> list[list[str]]:
    out = [[text], list(text)]
    for seed in range(6):
        rng = random.Random(seed)
        points = sorted(rng.sample(range(1, len(text)), min(max(len(text) - 1, 0), rng.randint(1, 12))))
        out.append([text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)])
    return out


@pytest.mark.parametrize("case", CASES)
def test_parse_splits_reasoning_from_the_answer(case):
    name, text, reasoning, content = CASES[case]
    assert get_reasoning_parser(name).parse(text) == (reasoning, content)


@pytest.mark.parametrize("case", CASES)
def test_streamed_deltas_add_up_to_the_parse_however_the_text_is_cut(case):
    name, text, _, _ = CASES[case]
    parser = get_reasoning_parser(name)
    for pieces in _cuts(text):
        streamer = parser.streamer()
        deltas = [d for p in pieces for d in streamer.feed(p)] + streamer.finish()
        for d in deltas:
            assert len(d) == 1 and set(d) <= {"reasoning_content", "content"} and next(iter(d.values()))
        keys = [next(iter(d)) for d in deltas]
        assert keys == sorted(keys, reverse=True), "all reasoning comes before the answer"
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas) or None
        content = "".join(d.get("content", "") for d in deltas) or None
        assert (reasoning, content) == parser.parse(text), pieces


def test_a_possible_closing_tag_is_held_until_it_is_known():
    s = get_reasoning_parser("deepseek_r1").streamer()
    assert s.feed("<think>\nHmm </thi") == [{"reasoning_content": "Hmm"}]
    assert s.feed("nk>\n\nYes") == [{"content": "Yes"}]


def test_an_unknown_parser_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("o1")
    assert sorted(REASONING_PARSERS) == ["deepseek_r1", "qwen3"]
