"""Splitting a reasoning model's `<think>...</think>` text from its answer, whole (`parse`) or as a stream of
OpenAI chat deltas (`reasoning_content`, then `content`); the two agree on every text however it is cut.

`deepseek_r1`: the chat template opens `<think>` in the prompt, so the output may start inside the reasoning:
everything up to `</think>` is reasoning, with or without an opening tag (all of it, if `</think>` never
comes). `qwen3`: reasoning only when the output starts with `<think>` (with thinking off, it does not).
Each part is stripped; the answer goes on to the tool-call parser, if any (router/chat_output.py).
"""

from typing import Any

from router.tool_parsers import TrimmedText, marker_tail

_OPEN, _CLOSE = "<think>", "</think>"


class ReasoningParser:
    opened_in_prompt = False  # the output begins inside the reasoning even without <think>

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content), each stripped, None if empty."""
        head = text.lstrip()
        if head.startswith(_OPEN):
            text = head[len(_OPEN):]
        elif not self.opened_in_prompt:
            return None, text.strip() or None
        reasoning, _, content = text.partition(_CLOSE)
        return reasoning.strip() or None, content.strip() or None

    def streamer(self) -> "ReasoningStreamer":
        return ReasoningStreamer(self.opened_in_prompt)


class DeepSeekR1Parser(ReasoningParser):
    opened_in_prompt = True


class Qwen3Parser(ReasoningParser):
    opened_in_prompt = False


class ReasoningStreamer:
    """`feed` each piece of text, then `finish`; each returns the deltas that piece produced. Text that may be
    the start of `<think>` (at the beginning) or of `</think>` is held until it is known."""

    def __init__(self, opened_in_prompt: bool):
        self._opened_in_prompt = opened_in_prompt
        self._state = "start"  # "start" (before the first word) -> "reasoning" -> "content"
        self._buf = ""
        self._reasoning = TrimmedText()
        self._content = TrimmedText()

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self._buf += delta
        return self._read(final=False)

    def finish(self) -> list[dict[str, Any]]:
        """Whatever was held back, once the text has ended."""
        return self._read(final=True)

    def _read(self, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._state == "start":
            head = self._buf.lstrip()
            if head.startswith(_OPEN):
                self._buf = head[len(_OPEN):]
            elif not final and _OPEN.startswith(head):
                return out
            self._state = "reasoning" if head.startswith(_OPEN) or self._opened_in_prompt else "content"
        if self._state == "reasoning":
            end = self._buf.find(_CLOSE)
            if end < 0:
                keep = 0 if final else marker_tail(self._buf, _CLOSE)
                self._send(out, "reasoning_content", self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return out
            self._send(out, "reasoning_content", self._buf[:end])
            self._buf = self._buf[end + len(_CLOSE):]
            self._state = "content"
        self._send(out, "content", self._buf)
        self._buf = ""
        return out

    def _send(self, out: list[dict[str, Any]], key: str, text: str) -> None:
        text = (self._reasoning if key == "reasoning_content" else self._content).push(text)
        if text:
            out.append({key: text})


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {"deepseek_r1": DeepSeekR1Parser, "qwen3": Qwen3Parser}


def get_reasoning_parser(name: str) -> ReasoningParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}: one of {', '.join(sorted(REASONING_PARSERS))}")
    return REASONING_PARSERS[name]()
