"""A torch-free tokenizer with chat template, loaded from tokenizer files (tokenizer.json + config).

The router and the workers both use this class, so that they agree token for token. The chat template is
rendered the way transformers renders it (sandboxed jinja2, trim_blocks, lstrip_blocks).
"""

import contextlib
import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


class ChatTemplateError(ValueError):
    """The messages could not be rendered with the model's chat template."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older configs store AddedToken dicts
        return value.get("content")
    return value


class ChatTokenizer:
    def __init__(self, tokenizer_json: str, config: dict[str, Any], chat_template: str | None = None):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        template = chat_template or config.get("chat_template")
        self.chat_template_source: str | None = template
        self._template = _compile_template(template) if template else None

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatTokenizer":
        path = Path(path)
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template_path = path / "chat_template.jinja"
        template = template_path.read_text() if template_path.exists() else None
        return cls((path / "tokenizer.json").read_text(), config, template)

    @classmethod
    def from_files(cls, files: dict[str, str]) -> "ChatTokenizer":
        """From the file contents a worker serves (name -> text)."""
        config = json.loads(files.get("tokenizer_config.json", "{}"))
        return cls(files["tokenizer.json"], config, files.get("chat_template.jinja"))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # transformers renders, then encodes without adding special tokens: the template places them.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Several texts at once, releasing the GIL and spreading the batch over cores (no offsets computed)."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    # --- text split at special tokens (the router caches the parts: a chat resends its earlier messages) ---

    @functools.cached_property
    def _splitter(self) -> tuple[re.Pattern, dict[str, int]] | None:
        """The added tokens `tokenizers` cuts out of the raw text before anything else (not normalized, no
        stripping or word matching), as a regex, leftmost-longest like tokenizers' own matcher."""
        tokens = {a.content: i for i, a in self.tokenizer.get_added_tokens_decoder().items()
                  if a.content and not (a.normalized or a.lstrip or a.rstrip or a.single_word)}
        if not tokens:
            return None
        pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
        return pattern, tokens

    def split_special(self, text: str) -> list[str | int] | None:
        """text as its ordinary parts (str) and the ids of the added tokens between them (int), in order;
        None when this tokenizer does not tokenize such parts independently (see splits_exactly)."""
        return self._split(text) if self.splits_exactly else None

    def _split(self, text: str) -> list[str | int]:
        pattern, ids = self._splitter
        out: list[str | int] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(ids[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    @functools.cached_property
    def splits_exactly(self) -> bool:
        """Whether encoding the parts of split_special one by one gives encode(text)'s ids, checked on probe
        texts: true for byte-level BPE (Llama 3, Qwen, SmolLM2); false e.g. where a pre-tokenizer treats the
        start of a text specially (SentencePiece's prefix space), which would differ for every part."""
        if self._splitter is None:
            return False
        specials = sorted(self._splitter[1], key=len)[:4]
        pieces = ["Hello", " world", "\n", "\n\n", "  two spaces", "x", "12345", "héllo naïve 🙂", "\t", " "]
        probes = [s + p + s for s in specials for p in pieces] + ["".join(specials + pieces), pieces[0] + specials[0]]
        if self._template is not None:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi\n there "},
                        {"role": "assistant", "content": "Hello! 12"}, {"role": "user", "content": "naïve 🙂?"}]
            with contextlib.suppress(ChatTemplateError):
                probes.append(self.render_chat(messages))
        for text in probes:
            got = [i for part in self._split(text)
                   for i in ([part] if isinstance(part, int) else self.encode(part, add_special_tokens=False))]
            if got != self.encode(text, add_special_tokens=False):
                return False
        return True
