"""Grammar-constrained decoding (structured outputs), with llguidance.

A request with a grammar (SamplingParams.grammar, see protocol/grammar.py) has a matcher: its place in the
grammar. Each token it samples advances the matcher (`advance`); before each of its samplings the engine
has the matchers of the step's constrained rows write their masks of allowed tokens (`masks`: one call into
llguidance, which fills them on its own threads, outside the GIL), copies them to the device, and the
sampler sets every other token's logit to -inf. Unconstrained rows in the same batch are not touched. With
steps queued ahead of the device, the masks of step N+1 are computed once step N's tokens are read, while the
device runs step N+1's forward (engine/llm_engine.py), on a thread of their own while the engine's thread
turns step N's tokens into outputs and schedules step N+2; step N+1's sampling is queued after that, just
before step N+2's forward, so the device is never left without work while the masks are filled.

Matchers are built from one tokenizer (llguidance's view of the model's tokenizer.json, built on the first
constrained request: ~0.2 s for a 49k vocabulary on the CI machine) and, per grammar, a template matcher
kept in an LRU and copied for each request (~10 us, against ~0.9 ms to build one for a small JSON schema).

Why llguidance rather than xgrammar (bench.structured measures both): it is torch-free, so the router
checks a grammar and refuses a bad one with a 400 before admission, streams included; it has no compile
step; and its masks, a little slower a token than xgrammar's, are filled in parallel behind the forward.
"""

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait

import llguidance
import torch

from engine.device import to_device
from engine.errors import RequestError
from protocol.grammar import to_llguidance

log = logging.getLogger("pdserve.engine")
_CACHED_GRAMMARS = 256
GrammarMasks = tuple[torch.Tensor, torch.Tensor]  # (rows of the step's samples, their [rows, vocab] bool masks)


class Grammars:
    """The engine's matchers (rank 0's): built per request from cached templates; masks filled per step."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], max_rows: int,
                 device: torch.device):
        self._tokenizer_json = tokenizer_json
        self._eos = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self.device = device
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._templates: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._executor = llguidance.LLExecutor()
        # Masks are filled on this thread (llguidance lets go of the GIL) while the engine's thread reads the
        # step's outputs: the two overlap.
        self._filler = ThreadPoolExecutor(1, thread_name_prefix="pdserve-grammar")
        self._filling: Future | None = None  # the last fill started (its rows are written into self._host)
        words = (vocab_size + 31) // 32
        # Rows are written by llguidance through a pointer, then copied to the device from pinned memory.
        self._host = torch.full((max_rows, words), -1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)

    def matcher(self, grammar: tuple[str, str]) -> llguidance.LLMatcher:
        """A fresh matcher for a request's grammar; RequestError when the grammar cannot be built."""
        template = self._templates.get(grammar)
        if template is None:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                         eos_token=self._eos)
                log.info("structured outputs: llguidance tokenizer built (%d tokens)", self.vocab_size)
            try:
                template = llguidance.LLMatcher(self._tokenizer, to_llguidance(*grammar), log_level=0)
            except ValueError as e:
                raise RequestError(f"the {grammar[0]} cannot be used: {e}") from None
            if template.is_error():
                raise RequestError(f"the {grammar[0]} cannot be used: {template.get_error()}")
            self._templates[grammar] = template
            if len(self._templates) > _CACHED_GRAMMARS:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(grammar)
        return template.deep_copy()

    @staticmethod
    def advance(matcher: llguidance.LLMatcher, token: int) -> bool:
        """Take a sampled token; False when the grammar refuses it (the request cannot go on)."""
        return matcher.consume_token(token)

    def masks(self, matchers: list[tuple[int, llguidance.LLMatcher]]) -> GrammarMasks:
        """(rows, allowed): the sampled rows under a grammar and their [rows, vocab] bool masks, on the
        device. matchers: (row in the step's samples, matcher), at most max_rows of them."""
        return self.finish_masks(self.start_masks(matchers))

    def start_masks(self, matchers: list[tuple[int, llguidance.LLMatcher]]) -> tuple[list, Future]:
        """Start filling the masks of these rows on the grammar thread; finish_masks waits and sends them to
        the device. The matchers must not change until then."""
        n = len(matchers)
        if n > len(self._host):  # remote starts are not capped by max_num_seqs: grow
            if self._filling is not None:  # (a fill a failed step left behind must not write into freed memory)
                wait([self._filling])
            self._host = torch.full((n, self._host.shape[1]), -1, dtype=torch.int32, pin_memory=self._host.is_pinned())
        host = self._host[:n]
        work = [(m, i) for i, (_, m) in enumerate(matchers)]
        self._filling = self._filler.submit(self._executor.unsafe_compute_mask_ptr, work, host.data_ptr(),
                                            host.shape[1] * 4, n)
        return matchers, self._filling

    def finish_masks(self, started: tuple[list, Future]) -> GrammarMasks:
        matchers, filled = started
        filled.result()
        n = len(matchers)
        bits = self._host[:n].to(self.device, non_blocking=True)
        allowed = ((bits[:, :, None] >> self._shifts) & 1).view(n, -1)[:, : self.vocab_size].bool()
        rows = to_device([r for r, _ in matchers], self.device, torch.int64)
        return rows, allowed


def apply_masks(logits: torch.Tensor, masks: GrammarMasks) -> torch.Tensor:
    """The logits with every token a row's grammar does not allow at -inf (the other rows as they were)."""
    rows, allowed = masks
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits
