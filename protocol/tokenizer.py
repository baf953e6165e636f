"""A torch-free tokenizer with chat template, loaded from tokenizer files (tokenizer.json + config).

The router and the workers both use this class, so that they agree token for token. The chat template is
rendered the way transformers renders it (sandboxed jinja2, trim_blocks, lstrip_blocks), from a cached
skeleton where the template only pastes the contents in (protocol.chat_template).

Byte-level BPE tokenizers (GPT-2's family, Llama 3, Qwen, SmolLM2) also get a tiktoken encoder built from
the same tokenizer.json (`fast_bpe`): ~4x faster than `tokenizers` on a 1.6 KB prompt (bench.router_tokenize),
a large part of the router's time a request. It is used by `encode_batch` only where it gave `tokenizers`' ids on probe texts
when it was built; anything else (other models, normalizers, added tokens it cannot cut out the same way)
stays on `tokenizers`.
"""

import contextlib
import functools
import itertools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from protocol.chat_template import ChatTemplate, ChatTemplateError

log = logging.getLogger("pdserve.tokenizer")

# Probe texts for checking a way of tokenizing against `tokenizers` (ChatTokenizer._probe_texts).
_PROBE_PIECES = ["Hello", " world", "\n", "\n\n", "  two spaces", "x", "12345", "héllo naïve 🙂", "\t", " "]
_PROBE_TEXTS = ["Hello world", " leading space", "trailing  ", "a\n\nb\r\n\tc", "   \n  x", "12345678901234",
                "3.14159 and -42e10", "naïve café Ünïcödé façade", "日本語のテキストと中文", "emoji 🙂🚀👍🏽 done",
                "don't won't I'm you'll they've she'd", "CamelCaseWords and snake_case_words",
                "def f(x):\n    return {'a': [1, 2]}  # comment\n", "<html><body class=\"x\">&amp;</body></html>",
                "ALL CAPS SHOUTING!!! ??? ...", "tabs\tand\u00a0nbsp\u2009thin", "mixed123abc456 x1y2z3",
                "https://example.com/a?b=c&d=e#f", "   ", "\n", "ab" * 300, " ".join(["word"] * 200),
                "control\x04bytes\x06 a\x04b \x1d\x1f end", "\U00040000 rare plane \U000f0000"]
_PROBE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi\n there "},
               {"role": "assistant", "content": "Hello! 12"}, {"role": "user", "content": "naïve 🙂?"}]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older configs store AddedToken dicts
        return value.get("content")
    return value


class ChatTokenizer:
    def __init__(self, tokenizer_json: str, config: dict[str, Any], chat_template: str | None = None,
                 use_fast: bool = True):
        """use_fast=False (or PDSERVE_FAST_TOKENIZER=0 in the environment): tokenizers only, no fast_bpe."""
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.use_fast = use_fast and os.environ.get("PDSERVE_FAST_TOKENIZER", "1") != "0"
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        template = chat_template or config.get("chat_template")
        self.chat_template_source: str | None = template
        self._template = ChatTemplate(template, self.bos_token or "", self.eos_token or "") if template else None

    @classmethod
    def from_dir(cls, path: str | Path, use_fast: bool = True) -> "ChatTokenizer":
        path = Path(path)
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template_path = path / "chat_template.jinja"
        template = template_path.read_text() if template_path.exists() else None
        return cls((path / "tokenizer.json").read_text(), config, template, use_fast)

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
        return self._template.render(messages, add_generation_prompt, tools)

    def render_chat_parts(self, messages: list[dict[str, Any]]) -> list[str | int] | None:
        """split_special(render_chat(messages)), made from the template's skeleton without rendering and cutting
        the whole text (~2 against ~8 us for one 1.6 KB message, ~35 against ~85 after 20 ms idle, on the CI
        machine); None where the template or the messages do not allow it (then render and split)."""
        if self._template is None or not self.splits_exactly:
            return None
        return self._template.render_parts(messages, self._split, self._splitter[1])

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # transformers renders, then encodes without adding special tokens: the template places them.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True, parallel: bool = False,
                     plain: bool = False) -> list[list[int]]:
        """Several texts at once (no offsets computed): through fast_bpe where it exists (without the
        post-processor's special tokens), else `tokenizers`, releasing the GIL and spreading over cores.
        parallel: `tokenizers` even where fast_bpe exists (fast_bpe is faster on one core but holds the GIL;
        `tokenizers` lets the calling process's other threads run meanwhile). plain: the texts hold no added
        token (they are parts from split_special), so fast_bpe need not look for them."""
        if not add_special_tokens and self.fast_bpe is not None and not parallel:
            return [self._encode_fast(self.fast_bpe, t, plain) for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def _encode_fast(self, fast: tuple, text: str, plain: bool = False) -> list[int]:
        enc, rank_to_id, unmapped = fast
        parts = self._split(text) if self._splitter is not None and not plain else [text]
        out: list[int] = []
        for part in parts:
            if isinstance(part, int):
                out.append(part)
            elif unmapped is not None and unmapped.search(part):
                out += self.tokenizer.encode(part, add_special_tokens=False).ids  # a byte it lacks: dropped there
            elif rank_to_id is None:
                out += enc.encode_ordinary(part)
            else:
                out += [rank_to_id[r] for r in enc.encode_ordinary(part)]
        return out

    @functools.cached_property
    def fast_bpe(self) -> tuple | None:
        """(tiktoken encoder, rank -> token id or None where they are equal, a regex of the bytes the vocabulary
        lacks or None) for a byte-level BPE whose ids it reproduces on the probe texts; None otherwise (tiktoken
        missing, another kind of tokenizer, or any probe that tokenizes differently)."""
        if not self.use_fast:
            return None
        try:
            import tiktoken
        except ImportError:
            return None
        spec = json.loads(self.tokenizer.to_str())
        built = _tiktoken_spec(spec, self.tokenizer.get_added_tokens_decoder(), self._splitter)
        if built is None:
            return None
        pattern, ranks, rank_to_id, unmapped = built
        try:
            enc = tiktoken.Encoding("pdserve", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        except ValueError as e:  # a pre-tokenizer regex tiktoken's engine does not take
            log.info("no fast tokenizer: %s", e)
            return None
        fast = (enc, rank_to_id, unmapped)
        for text in self._probe_texts():
            if self._encode_fast(fast, text) != self.encode(text, add_special_tokens=False):
                log.warning("the fast tokenizer differs from tokenizers on %r: not used", text[:80])
                return None
        return fast

    def _probe_texts(self) -> list[str]:
        """Texts both checks of this tokenizer run on (splits_exactly, fast_bpe): tricky plain text, the same
        with special tokens around and between it, and a chat through the template."""
        texts = [*_PROBE_TEXTS, *_PROBE_PIECES]
        if self._splitter is not None:
            specials = sorted(self._splitter[1], key=len)[:4]
            texts += [s + p + s for s in specials for p in _PROBE_PIECES + _PROBE_TEXTS[:6]]
            texts += ["".join(specials + _PROBE_PIECES), _PROBE_PIECES[0] + specials[0]]
        if self._template is not None:
            with contextlib.suppress(ChatTemplateError):
                texts.append(self.render_chat(_PROBE_CHAT))
        return texts

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
        for text in self._probe_texts():
            got = [i for part in self._split(text)
                   for i in ([part] if isinstance(part, int) else self.encode(part, add_special_tokens=False))]
            if got != self.encode(text, add_special_tokens=False):
                return False
        return True


_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's bytes_to_unicode), reversed."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _chars_with_bytes(missing: bytes) -> "_LackedBytes":
    """A search for the characters whose UTF-8 encoding (surrogates passed through) holds one of these bytes. A
    character's bytes are its lead byte and continuation bytes (0x80-0xBF); where none of the latter is
    missing, a lead byte stands for a range of characters, searched in the text itself, not its encoding
    (~1 against ~4 us a 1.6 KB prompt). Else any non-ASCII character may hold one: those are searched in the
    encoding."""
    ascii_chars = "".join(chr(b) for b in missing if b < 0x80)
    if any(0x80 <= b <= 0xBF for b in missing):
        return _LackedBytes(ascii_chars, re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in missing) + b"]"))
    ranges = []
    for b in missing:
        if b < 0x80:
            continue
        if 0xC2 <= b <= 0xDF:  # two bytes: 5 bits from the lead, 6 from the continuation
            lo = (b & 0x1F) << 6
            hi = lo + 0x3F
        elif 0xE0 <= b <= 0xEF:  # three bytes (0xE0's shortest is U+0800)
            lo = max((b & 0x0F) << 12, 0x800)
            hi = ((b & 0x0F) << 12) + 0xFFF
        elif 0xF0 <= b <= 0xF4:  # four bytes (0xF0's shortest is U+10000; 0xF4 ends at U+10FFFF)
            lo = max((b & 0x07) << 18, 0x10000)
            hi = min(((b & 0x07) << 18) + 0x3FFFF, 0x10FFFF)
        else:  # 0xC0, 0xC1, 0xF5-0xFF: in no encoding
            continue
        ranges.append(re.escape(chr(lo)) + ("" if lo == hi else "-" + re.escape(chr(hi))))
    return _LackedBytes(ascii_chars, re.compile("[" + "".join(ranges) + "]") if ranges else None)


class _LackedBytes:
    """`search(text)`: whether text holds one of the characters: the ASCII ones by `in` (str's fast search,
    ~0.6 us a 1.6 KB prompt on the CI machine against ~19 for a regex class that also holds non-ASCII
    ranges), the others by `pattern` (on the text's UTF-8 encoding where it is a bytes regex), run only
    where the text is not ASCII (str.isascii() reads a flag)."""

    def __init__(self, ascii_chars: str, pattern: "re.Pattern[str] | re.Pattern[bytes] | None"):
        self.ascii_chars = ascii_chars
        self.pattern = pattern

    def search(self, text: str) -> bool:
        for c in self.ascii_chars:
            if c in text:
                return True
        if self.pattern is None or text.isascii():
            return False
        if isinstance(self.pattern.pattern, bytes):
            return self.pattern.search(text.encode("utf-8", "surrogatepass")) is not None
        return self.pattern.search(text) is not None


def _tiktoken_spec(spec: dict[str, Any], added: dict, splitter
                   ) -> tuple[str, dict[bytes, int], list[int] | None, "_LackedBytes | None"] | None:
    """(pre-tokenizer regex, mergeable ranks, rank -> id or None, a search for the characters holding bytes
    the vocabulary lacks or None) equivalent to a byte-level BPE tokenizer.json, or None where it is not one.
    Ranks follow the merges' order (the merge priority), single bytes first."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or spec.get("normalizer") is not None or model.get("dropout")
            or model.get("byte_fallback") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pattern = _GPT2_PATTERN
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, level = pre["pretokenizers"]
        if (split.get("type") != "Split" or "Regex" not in split.get("pattern", {}) or split.get("invert")
                or split.get("behavior") != "Isolated" or level.get("type") != "ByteLevel"
                or level.get("use_regex", True) or level.get("add_prefix_space")):
            return None
        pattern = split["pattern"]["Regex"]
    else:
        return None
    # Every added token must be one the splitter cuts out of the raw text, as tokenizers does.
    cut = set(splitter[1].values()) if splitter is not None else set()
    if any(i not in cut for i, a in added.items() if a.content):
        return None
    alphabet = _byte_alphabet()
    try:
        by_bytes = {bytes(alphabet[c] for c in t): i for t, i in model["vocab"].items()}
    except KeyError:  # a vocabulary entry outside the byte alphabet
        return None
    # A byte outside the vocabulary (e.g. 0xC0, or some control bytes in SmolLM2's) is dropped by tokenizers
    # (no unk token) before its neighbours merge, which tiktoken cannot do: texts holding one stay on
    # tokenizers (`unmapped`). It still gets a rank: tiktoken wants every byte.
    ranks = {bytes([b]): b for b in range(256)}
    missing = bytes(b for b in range(256) if bytes([b]) not in by_bytes)
    unmapped = _chars_with_bytes(missing) if missing else None
    for k, m in enumerate(model.get("merges", [])):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        merged = bytes(alphabet[c] for c in left + right)
        if merged not in by_bytes:
            return None
        ranks.setdefault(merged, 256 + k)
    if model.get("unk_token") is not None and missing:
        return None  # unknown bytes would become the unk token
    # Where the merged tokens' ids grow in merge order (GPT-2's family, SmolLM2), the ids themselves can be the
    # ranks: tiktoken then gives ids, with no mapping a token (~3.5 us a 1.6 KB prompt). Single bytes are never
    # compared by rank (only pairs are merged by it), so theirs are their ids, or free numbers where missing.
    merged_ids = [by_bytes[b] for b, r in sorted(ranks.items(), key=lambda x: x[1]) if r >= 256]
    if all(a < b for a, b in zip(merged_ids, merged_ids[1:], strict=False)):
        free = itertools.count(max(by_bytes.values()) + 1)
        as_ids = {b: by_bytes[b] if b in by_bytes else next(free) for b in ranks}
        return pattern, as_ids, None, unmapped
    rank_to_id = [-1] * (max(ranks.values()) + 1)
    for b, r in ranks.items():
        rank_to_id[r] = by_bytes.get(b, -1)
    return pattern, ranks, rank_to_id, unmapped  # (ids equal to ranks grow in merge order: taken above)
