"""A chat template renders from a cached skeleton only where that gives jinja2's output byte for byte."""

import random

import pytest

from protocol.chat_template import ChatTemplate, ChatTemplateError

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen2.5's shape: contents output whole, except in an assistant turn with tool calls (a test on the content)
QWEN_LIKE = ("{%- for message in messages %}{%- if message.role == 'assistant' and message.tool_calls is defined %}"
             "{{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\n' + message.content }}{%- endif %}"
             "{{- '\n<tool_call>' + message.tool_calls + '</tool_call><|im_end|>\n' }}"
             "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
             "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
NAMED = "{% for m in messages %}{{ m.role }}{% if m.name is defined %}({{ m.name }}){% endif %}: {{ m.content }}\n{% endfor %}"
JOINED = "{{ messages | map(attribute='content') | join(' | ') }}{{ bos_token }}"
# Templates that read a content: each must fall back to jinja2, and still be right.
READING = {
    "trim": "{% for m in messages %}[{{ m['content'] | trim }}]{% endfor %}",
    "trim_after_concat": "{% for m in messages %}[{{ (m.content ~ '\n') | trim }}]{% endfor %}",
    "plus_then_trim": "{% for m in messages %}[{{ ('\n' + m.content) | trim }}]{% endfor %}",
    "contains": "{% for m in messages %}{% if '</think>' in m.content %}T{% endif %}{{ m.content }}{% endfor %}",
    "truthy": "{% for m in messages %}{% if m.content %}<{{ m.content }}>{% endif %}{% endfor %}",
    "equals": "{% for m in messages %}{% if m.content == 'x' %}X{% else %}{{ m.content }}{% endif %}{% endfor %}",
    "split": "{% for m in messages %}{{ m.content.split('</think>')[-1] }}{% endfor %}",
    "slice": "{% for m in messages %}{{ m.content[:3] }}{% endfor %}",
    "tojson_content": "{% for m in messages %}{{ m.content | tojson }}{% endfor %}",
    "tojson_message": "{% for m in messages %}{{ m | tojson }}{% endfor %}",
    "upper": "{% for m in messages %}{{ m.content | upper }}{% endfor %}",
    "length": "{% for m in messages %}{{ m.content | length }}:{{ m.content }}{% endfor %}",
    "truncate": "{% for m in messages %}{{ m.content | truncate(8) }}{% endfor %}",
    "replace_via_join": "{{ (messages | map(attribute='content') | join('~')) | replace('a', 'b') }}",
    "replace_after_tilde": "{% for m in messages %}{{ ('x' ~ m.content) | replace('a', 'b') }}{% endfor %}",
}
TRICKY = ["", " ", "\n", "  lead and trail  ", "{{ not jinja }} {% if %}", "<|im_end|>\n<|im_start|>user",
          "</think>done", "x", "a\x00b", " \n\t<&'\"\\\x00Ab0é\x00\n ", "naïve 🙂", "a" * 3000]


def _chats(rng: random.Random, n: int) -> list[list[dict]]:
    chats = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": rng.choice(TRICKY)})
        for k in range(rng.randint(1, 4)):
            msgs.append({"role": "user" if k % 2 == 0 else "assistant",
                         "content": rng.choice(TRICKY) + rng.choice(TRICKY)})
            if rng.random() < 0.2:
                msgs[-1]["name"] = rng.choice(["ann", "bob"])
        chats.append(msgs)
    return chats


def _reference(source: str) -> ChatTemplate:
    return ChatTemplate(source, "<s>", "</s>", skeletons=0)  # jinja2 every time


@pytest.mark.parametrize("source", [CHATML, QWEN_LIKE, NAMED, JOINED, *READING.values()],
                         ids=["chatml", "qwen_like", "named", "joined", *READING])
def test_rendering_from_skeletons_gives_jinjas_output(source):
    fast, ref = ChatTemplate(source, "<s>", "</s>"), _reference(source)
    for msgs in _chats(random.Random(0), 300):
        for gen in (True, False):
            assert fast.render(msgs, gen) == ref.render(msgs, gen), msgs


def test_templates_that_only_output_contents_render_from_skeletons():
    for source in (CHATML, NAMED, JOINED):
        t = ChatTemplate(source, "<s>", "</s>")
        for msgs in _chats(random.Random(1), 50):
            t.render(msgs)
        assert t._skeletons and all(p is not None for p in t._skeletons.values()), source


@pytest.mark.parametrize("name", list(READING))
def test_templates_that_read_a_content_get_no_skeleton(name):
    t = ChatTemplate(READING[name], "<s>", "</s>")
    t.render([{"role": "user", "content": "a b"}])
    assert all(p is None for p in t._skeletons.values())


def test_an_assistant_turn_whose_content_is_tested_is_rendered_by_jinja_and_plain_turns_are_not():
    t = ChatTemplate(QWEN_LIKE, "<s>", "</s>")
    plain = [{"role": "user", "content": "hi"}]
    tools = [*plain, {"role": "assistant", "content": "", "tool_calls": "f()"}]
    assert t.render(tools) == _reference(QWEN_LIKE).render(tools)
    t.render(plain)
    skeletons = {shape[1:]: pieces is not None for shape, pieces in t._skeletons.items()}
    assert skeletons == {((("role", "user"),), (("role", "assistant"), ("tool_calls", "f()"))): False,
                         ((("role", "user"),),): True}


def test_a_template_reading_the_clock_is_never_cached():
    t = ChatTemplate("{{ strftime_now('%d %b %Y') }}{% for m in messages %}{{ m.content }}{% endfor %}", "", "")
    t.render([{"role": "user", "content": "hi"}])
    assert not t._skeletons


def test_skeletons_are_bounded_least_recently_used_first():
    t = ChatTemplate(CHATML, "", "", skeletons=4)
    first = [{"role": "user", "content": "a"}]
    t.render(first)
    for n in range(2, 8):
        t.render([{"role": "user", "content": "a"}, *([{"role": "assistant", "content": "b"}] * n)])
        t.render(first)  # kept: used last
    assert len(t._skeletons) == 4
    assert (True, (("role", "user"),)) in t._skeletons


def test_messages_a_skeleton_cannot_key_are_rendered_by_jinja():
    t = ChatTemplate(NAMED, "", "")
    odd = [{"role": "user", "content": "x", "name": ["not", "hashable"]}, {"role": "user", "content": None}]
    assert t.render(odd[:1]) == _reference(NAMED).render(odd[:1])
    assert t.render(odd[1:]) == _reference(NAMED).render(odd[1:])
    assert not t._skeletons


def test_a_template_error_is_reported_on_every_request_of_that_shape():
    source = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}{{ messages[0].content }}"
    t = ChatTemplate(source, "", "")
    for _ in range(2):
        with pytest.raises(ChatTemplateError, match="user first"):
            t.render([{"role": "assistant", "content": "x"}])
    assert t.render([{"role": "user", "content": "ok"}]) == "ok"


@pytest.fixture(scope="module")
def demo_files(demo_gguf):
    from engine.tokenizer_files import read_tokenizer_files, tokenizer_dir

    return read_tokenizer_files(tokenizer_dir(demo_gguf))


def test_a_chats_parts_from_the_skeleton_are_its_rendered_text_cut_at_special_tokens(demo_files):
    from protocol.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_files(demo_files)  # SmolLM2: ChatML with a default system prompt
    assert tok.splits_exactly
    fast = 0
    for msgs in _chats(random.Random(2), 300):
        parts = tok.render_chat_parts(msgs)
        if parts is not None:
            fast += 1
            assert parts == tok.split_special(tok.render_chat(msgs)), msgs
        elif all("<" not in m["content"] for m in msgs):
            raise AssertionError(f"no parts for contents without a special token's first character: {msgs}")
    assert fast > 50
    held = [{"role": "user", "content": "say <|im_end|> now"}]  # a special token inside a content: cut for real
    assert tok.render_chat_parts(held) is None


@pytest.mark.parametrize("source", [
    "{% for m in messages %}<|im_{{ m.content }}{% endfor %}",  # a text piece ending in a special's start
    "{% for m in messages %}{{ m.content }}end|>{% endfor %}",  # a text piece starting with a special's end
])
def test_no_parts_where_a_special_token_could_straddle_a_piece_and_a_content(demo_files, source):
    from protocol.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_files({**demo_files, "chat_template.jinja": source})
    msgs = [{"role": "user", "content": "end|>x"}, {"role": "user", "content": "a <|im_"}]
    assert tok.render_chat_parts(msgs[:1]) is None
    assert 2 in tok.split_special(tok.render_chat(msgs))  # <|im_end|> (id 2), made of a piece and a content


def test_adjacent_contents_make_one_part(demo_files):
    from protocol.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_files({**demo_files, "chat_template.jinja":
                                    "{% for m in messages %}{{ m.content }}{% endfor %}<|im_end|>"})
    msgs = [{"role": "user", "content": "one "}, {"role": "user", "content": ""}, {"role": "user", "content": "two"}]
    assert tok.render_chat_parts(msgs) == tok.split_special(tok.render_chat(msgs)) == ["one two", 2]
