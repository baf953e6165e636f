"""The torch-free tokenizer agrees with transformers token for token, chat template included."""

from engine.tokenizer_files import read_tokenizer_files, tokenizer_dir
from protocol.tokenizer import ChatTokenizer

CHATS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcödé and emoji 🚀?"},
     {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Again"}],
]


def test_chat_encoding_matches_transformers(demo_gguf, demo_hf):
    _, hf_tok = demo_hf
    tok = ChatTokenizer.from_files(read_tokenizer_files(tokenizer_dir(demo_gguf)))
    for messages in CHATS:
        expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(expected, list):
            expected = expected["input_ids"]
        assert tok.encode_chat(messages) == expected
    text = "The quick brown fox, 1234 times."
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
