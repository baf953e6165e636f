"""Incremental detokenization with stop strings: text deltas as tokens arrive, holding back what may
still turn into a stop string, so that streamed deltas add up to the non-streamed text."""

from collections.abc import Sequence

from tokenizers.decoders import DecodeStream

from protocol.tokenizer import ChatTokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, for tokenizers that merge spaces


class Detokenizer:
    def __init__(self, tokenizer: ChatTokenizer, prompt_ids: list[int], stop: tuple[str, ...],
                 skip_special_tokens: bool, include_stop: bool):
        # tokenizers' own incremental decoder (one call a token, in Rust; it holds back incomplete UTF-8),
        # primed with the prompt's last tokens for tokenizers that merge spaces.
        self.tokenizer = tokenizer.tokenizer
        self.stream = DecodeStream(ids=list(prompt_ids[-_CONTEXT_TOKENS:]), skip_special_tokens=skip_special_tokens)
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.include_stop = include_stop
        self.stop_hit: str | None = None  # the stop string found
        self.text = ""  # the text not yet emitted, after at most the last longest_stop emitted characters
        self.emitted = 0  # how much of self.text was emitted

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string was found (text is then cut at it)."""
        new = self.stream.step(self.tokenizer, token_id)
        if not new:
            return False
        if self.emitted > 256 + self.longest_stop:  # keep only what a stop string could still reach back into
            cut = self.emitted - self.longest_stop
            self.text, self.emitted = self.text[cut:], self.emitted - cut
        search_from = max(0, len(self.text) - self.longest_stop)
        self.text += new
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx >= 0:
                self.text = self.text[: idx + len(s) if self.include_stop else idx]
                self.stop_hit = s
                return True
        return False

    def resume(self, token_ids: Sequence[int]) -> None:
        """Take the outputs another worker already turned into text (a migrated stream): the state is then what
        that worker's was, and only what follows them is emitted. Replayed in one go, the text held back
        (a tail that could begin a stop string) is the same as one step at a time: it is always the longest
        such tail, which never reaches into text already emitted."""
        for t in token_ids:
            self.add(t)
        self.take_delta(final=False)

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
