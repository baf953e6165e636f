"""Incremental detokenization with stop strings: text deltas as tokens arrive, holding back what may
still turn into a stop string, so that streamed deltas add up to the non-streamed text."""

from protocol.tokenizer import ChatTokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, for tokenizers that merge spaces


class Detokenizer:
    def __init__(self, tokenizer: ChatTokenizer, prompt_ids: list[int], stop: tuple[str, ...],
                 skip_special_tokens: bool, include_stop: bool):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.skip = skip_special_tokens
        self.include_stop = include_stop
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string was found (text is then cut at it)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return False
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if not new:
            return False
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += new
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx >= 0:
                self.text = self.text[: idx + len(s) if self.include_stop else idx]
                return True
        return False

    def take_delta(self, final: bool) -> str:
        """New text since the last call; without `final`, a tail that could begin a stop string waits."""
        end = len(self.text)
        if not final:
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
