"""Reading a model's tool calls out of its generated text, per model family, whole (`parse`) or as a stream of
OpenAI chat deltas (`streamer`); the two agree on every text however it is cut into deltas.

Families: `hermes` (Hermes, Qwen2.5, Qwen3: `<tool_call>{json}</tool_call>` blocks), `llama3_json` (Llama 3.x:
the whole output is `{json}` or `{json}; {json}`, maybe after `<|python_tag|>`), `mistral` (`[TOOL_CALLS][...]`
or `[TOOL_CALLS]name[ARGS]{json}`). The markers must survive detokenizing: `[TOOL_CALLS]` is a special token.

A call is sent whole (its header, then its arguments in one fragment) once its text has ended and parsed;
until then the stream holds it back, so a call that turns out malformed is sent as the content it is instead.
Hermes and mistral `name[ARGS]` read each call alone: a malformed one stays in the content, in place, while
its well-formed siblings are calls. A mistral `[...]` list and a llama output are one unit: all calls or none.
Content is the text outside the calls, joined and stripped.
"""

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # the function names a request may declare (router/schemas.py)
_SPACE = re.compile(r"\s*")


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object, as json.dumps(obj, ensure_ascii=False) writes it
    id: str


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _stripped(text: str) -> str | None:
    return text.strip() or None


def _call_from(obj: Any) -> ToolCall | None:
    """A call from its decoded JSON, {"name": ..., "arguments" or "parameters": {...}}; None if it is not one."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as OpenAI sends them: JSON in a string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):  # malformed, or nested past what json reads
            return None
    if not isinstance(name, str) or not _NAME.fullmatch(name) or not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False), new_call_id())


def _call_from_json(text: str) -> ToolCall | None:
    try:
        return _call_from(json.loads(text))
    except (ValueError, RecursionError):  # malformed, or nested past what json reads
        return None


def marker_tail(text: str, marker: str) -> int:
    """How many characters at the end of text may be the start of marker (0 if none): held back, not sent."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class TrimmedText:
    """One channel of streamed text sent as str.strip() of the whole: leading whitespace is dropped and
    trailing whitespace held until more text follows it (at the end it is dropped)."""

    def __init__(self) -> None:
        self._started = False
        self._space = ""

    def push(self, text: str) -> str:
        """What to send now of text."""
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        body = text.rstrip()
        if not body:
            self._space += text
            return ""
        out = self._space + body
        self._space = text[len(body):]
        return out


class ToolStreamer:
    """A family's parser over a stream: `feed` each piece of text, then `finish`; each returns the OpenAI chat
    deltas that piece produced. Subclasses read `self._buf` in `_read`, sending with `_content` and `_call`."""

    def __init__(self) -> None:
        self.calls = 0  # tool calls sent: the caller ends the choice with finish_reason "tool_calls" if any
        self._buf = ""  # text received and not yet sent or decided
        self._scanned = 0  # how far _buf has been searched for the marker that ends the current call
        self._text = TrimmedText()
        self._out: list[dict[str, Any]] = []

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self._buf += delta
        self._read(final=False)
        return self._take()

    def finish(self) -> list[dict[str, Any]]:
        """Whatever was held back, once the text has ended."""
        self._read(final=True)
        return self._take()

    def _read(self, final: bool) -> None:
        raise NotImplementedError

    def _take(self) -> list[dict[str, Any]]:
        out, self._out = self._out, []
        return out

    def _content(self, text: str) -> None:
        text = self._text.push(text)
        if text:
            self._out.append({"content": text})

    def _call(self, call: ToolCall) -> None:
        i = self.calls
        self.calls += 1
        self._out.append({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                          "function": {"name": call.name, "arguments": ""}}]})
        self._out.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})

    def _outside(self, marker: str, final: bool) -> bool:
        """Send the content before marker; True once marker has been consumed from the buffer."""
        i = self._buf.find(marker)
        if i < 0:
            keep = 0 if final else marker_tail(self._buf, marker)
            self._content(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._content(self._buf[:i])
        self._buf = self._buf[i + len(marker):]
        self._scanned = 0
        return True

    def _find_end(self, marker: str) -> int:
        """Where marker starts in the buffer, or -1; each character is searched about once over the stream."""
        i = self._buf.find(marker, self._scanned)
        if i < 0:
            self._scanned = max(0, len(self._buf) - len(marker) + 1)
        return i


class ToolParser:
    """A family's parser: `parse` reads a whole text, `streamer` reads one as it comes."""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(the content outside the calls, stripped, None if empty; the calls)."""
        raise NotImplementedError

    def streamer(self) -> ToolStreamer:
        raise NotImplementedError


# hermes: <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>, any number, anywhere in the text.

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


class HermesParser(ToolParser):
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content, calls, pos = [], [], 0
        while (start := text.find(_OPEN, pos)) >= 0:
            content.append(text[pos:start])
            end = text.find(_CLOSE, start + len(_OPEN))
            stop = len(text) if end < 0 else end + len(_CLOSE)  # an unclosed block runs to the end
            call = _call_from_json(text[start + len(_OPEN):len(text) if end < 0 else end])
            if call is None:
                content.append(text[start:stop])
            else:
                calls.append(call)
            pos = stop
        content.append(text[pos:])
        return _stripped("".join(content)), calls

    def streamer(self) -> ToolStreamer:
        return HermesStreamer()


class HermesStreamer(ToolStreamer):
    def __init__(self) -> None:
        super().__init__()
        self._in_block = False

    def _read(self, final: bool) -> None:
        while True:
            if not self._in_block:
                if not self._outside(_OPEN, final):
                    return
                self._in_block = True
            end = self._find_end(_CLOSE)
            if end < 0 and not final:
                return
            body = self._buf if end < 0 else self._buf[:end]
            call = _call_from_json(body)
            if call is None:
                self._content(_OPEN + body + ("" if end < 0 else _CLOSE))
            else:
                self._call(call)
            self._buf = "" if end < 0 else self._buf[end + len(_CLOSE):]
            self._in_block = False


# llama3_json: the whole output is {"name": "f", "parameters": {...}} or several joined by ";",
# maybe after <|python_tag|>; anything else is content.

_PYTHON_TAG = "<|python_tag|>"


def _llama_calls(text: str) -> list[ToolCall] | None:
    """The calls that the whole of text is, or None if it is anything else."""
    text = text.strip()
    if text.startswith(_PYTHON_TAG):
        text = text[len(_PYTHON_TAG):]
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while True:
        try:
            obj, pos = decoder.raw_decode(text, _SPACE.match(text, pos).end())
        except (ValueError, RecursionError):  # malformed, or nested past what json reads
            return None
        call = _call_from(obj)
        if call is None:
            return None
        calls.append(call)
        pos = _SPACE.match(text, pos).end()
        if pos == len(text):
            return calls
        if text[pos] != ";":
            return None
        pos += 1


class Llama3JsonParser(ToolParser):
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls = _llama_calls(text)
        return (None, calls) if calls else (_stripped(text), [])

    def streamer(self) -> ToolStreamer:
        return Llama3JsonStreamer()


class Llama3JsonStreamer(ToolStreamer):
    """Decides from the output's first characters: `{` or `<|python_tag|>` is held whole to the end (a llama
    output that is a call ends there); anything else is content, sent as it comes."""

    def __init__(self) -> None:
        super().__init__()
        self._calls: bool | None = None  # undecided until the first characters

    def _read(self, final: bool) -> None:
        if self._calls is None:
            head = self._buf.lstrip()
            if head.startswith(("{", _PYTHON_TAG)):
                self._calls = True
            elif not final and _PYTHON_TAG.startswith(head):  # nothing yet, or maybe the tag's start
                return
            else:
                self._calls = False
        if not self._calls:
            self._content(self._buf)
            self._buf = ""
        elif final:
            calls = _llama_calls(self._buf)
            for call in calls or ():
                self._call(call)
            if not calls:
                self._content(self._buf)
            self._buf = ""


# mistral: [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...] (v3) or [TOOL_CALLS]f[ARGS]{...}, one marker a
# call (v11+, maybe with [CALL_ID]id before [ARGS]); the text before the first marker is content.

_TOOL_CALLS, _ARGS, _CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"


def _mistral_calls(segment: str) -> list[ToolCall] | None:
    """The calls that the text after one [TOOL_CALLS] (up to the next) is, or None if it is not calls."""
    segment = segment.strip()
    if segment.startswith("["):
        try:
            items = json.loads(segment)
        except (ValueError, RecursionError):  # malformed, or nested past what json reads
            return None
        calls = [_call_from(x) for x in items] if isinstance(items, list) else []
        return calls if calls and None not in calls else None
    name, sep, args = segment.partition(_ARGS)
    if not sep:
        return None
    try:
        call = _call_from({"name": name.partition(_CALL_ID)[0].strip(), "arguments": json.loads(args)})
    except (ValueError, RecursionError):  # malformed, or nested past what json reads
        return None
    return None if call is None else [call]


class MistralParser(ToolParser):
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        first, *segments = text.split(_TOOL_CALLS)
        content, calls = [first], []
        for segment in segments:
            found = _mistral_calls(segment)
            if found is None:
                content.append(_TOOL_CALLS + segment)
            else:
                calls += found
        return _stripped("".join(content)), calls

    def streamer(self) -> ToolStreamer:
        return MistralStreamer()


class MistralStreamer(ToolStreamer):
    """Content streams until the first [TOOL_CALLS]; each segment after it is sent once the next marker or
    the end shows where it stops."""

    def __init__(self) -> None:
        super().__init__()
        self._in_calls = False

    def _read(self, final: bool) -> None:
        if not self._in_calls:
            if not self._outside(_TOOL_CALLS, final):
                return
            self._in_calls = True
        while (end := self._find_end(_TOOL_CALLS)) >= 0 or final:
            segment = self._buf if end < 0 else self._buf[:end]
            self._buf = "" if end < 0 else self._buf[end + len(_TOOL_CALLS):]
            self._scanned = 0
            found = _mistral_calls(segment)
            if found is None:
                self._content(_TOOL_CALLS + segment)
            for call in found or ():
                self._call(call)
            if end < 0:
                return


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser,
                                        "mistral": MistralParser}


def get_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}: one of {', '.join(sorted(PARSERS))}")
    return PARSERS[name]()


def parser_for_template(chat_template: str | None) -> str | None:
    """The tool-call family a chat template teaches its model, from the markers it writes; None if unknown."""
    if not chat_template:
        return None
    if _TOOL_CALLS in chat_template:
        return "mistral"
    if _OPEN in chat_template:
        return "hermes"
    if _PYTHON_TAG in chat_template or ("<|start_header_id|>" in chat_template and "ipython" in chat_template):
        return "llama3_json"
    return None
