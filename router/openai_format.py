"""Turning worker output into OpenAI response bodies and stream chunks (chat and completions)."""

import time
from typing import Any

from protocol.messages import ChunkView, LogprobView
from protocol.tokenizer import ChatTokenizer


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def echoed_logprobs(prompt_ids: list[int], prompt: list[LogprobView] | None, lps: list[LogprobView]
                    ) -> list[LogprobView]:
    """A completion's logprobs with its echoed prompt's first (the first prompt token has none: null, as OpenAI),
    when the prompt's were asked for (prompt: None when they were not)."""
    if prompt is None:
        return lps
    return [LogprobView(prompt_ids[0], None, []), *prompt, *lps]


class Formatter:
    def __init__(self, tokenizer: ChatTokenizer, model: str, request_id: str, chat: bool):
        self.tok = tokenizer
        self.model = model
        self.id = request_id
        self.chat = chat
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _token(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def logprobs(self, lps: list[LogprobView], offset: int = 0) -> dict[str, Any] | None:
        if not lps:
            return None
        if self.chat:
            def entry(tid: int, lp: float) -> dict:
                t = self._token(tid)
                return {"token": t, "logprob": lp, "bytes": list(t.encode())}

            return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]}
                                for x in lps]}
        tokens = [self._token(x.token_id) for x in lps]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [None if x.logprob is None else {self._token(t): v for t, v in x.top} for x in lps],
                "text_offset": offsets}

    def chunk(self, index: int, c: ChunkView, first: bool, text_offset: int, text: str | None = None,
              lps: list[LogprobView] | None = None) -> dict[str, Any]:
        """A worker chunk as a stream chunk (text, lps: in place of the chunk's, e.g. the prompt echoed first)."""
        text = c.text if text is None else text
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text}
        choice["logprobs"] = self.logprobs(c.logprobs if lps is None else lps, text_offset)
        choice["finish_reason"] = c.finish_reason if c.finished else None
        if c.stop_reason is not None:
            choice["stop_reason"] = c.stop_reason  # the stop string that ended it (vLLM's field)
        return {"id": self.id, "object": self.object + ("" if not self.chat else ".chunk"), "created": self.created,
                "model": self.model, "choices": [choice]}

    def delta_chunk(self, index: int, delta: dict[str, Any], lps: list[LogprobView] | None,
                    finish_reason: str | None, stop_reason: str | None = None) -> dict[str, Any]:
        """A chat stream chunk holding one delta (content, reasoning or a tool call's part)."""
        choice = {"index": index, "delta": delta, "logprobs": self.logprobs(lps) if lps else None,
                  "finish_reason": finish_reason}
        if stop_reason is not None:
            choice["stop_reason"] = stop_reason
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def usage_chunk(self, u: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": [], "usage": u}

    def full(self, choices: list[tuple[str, str | None, list[LogprobView], dict | None, str | None]],
             u: dict[str, Any]) -> dict:
        """choices: (text, finish reason, logprobs, the message read from the text or None: the text is it, the
        stop string that ended it or None)."""
        out = []
        for i, (text, reason, lps, message, stop) in enumerate(choices):
            if self.chat:
                out.append({"index": i, "message": message or {"role": "assistant", "content": text},
                            "logprobs": self.logprobs(lps), "finish_reason": reason})
            else:
                out.append({"index": i, "text": text, "logprobs": self.logprobs(lps), "finish_reason": reason})
            if stop is not None:
                out[-1]["stop_reason"] = stop  # the stop string that ended it (vLLM's field)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": out, "usage": u}
