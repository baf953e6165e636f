"""Tokenizing off the event loop, in batches.

Tokenizing a 1.6 KB prompt is the largest single part of the router's work a request. Two tokenizers give
the same ids (ChatTokenizer checks it when it builds the fast one):
- tiktoken (`ChatTokenizer.fast_bpe`, byte-level BPE models): ~4x faster on one core, but it holds the GIL
  while it encodes (tiktoken 0.14: two threads tokenize no faster than one), so it overlaps no work with
  the event loop, in a thread or not;
- `tokenizers`' `encode_batch_fast`: slower a prompt, but it releases the GIL and spreads a batch over the
  cores, so the loop keeps serving while other cores tokenize.
Prompts that arrive while the router is quiet (nothing queued, none in the last QUIET_S) or that are
short are tokenized inline on the loop, with the fastest tokenizer: a thread hand-off costs more than it
saves when requests come one at a time (~0.5 ms of wake-ups against ~0.35 ms of tokenizing, measured on
the CI machine). Under load, prompts queue for the thread's next batch, which goes through `tokenizers`
where the process has cores to spare (`parallel`: PARALLEL_MIN_CPUS or more), else through tiktoken.
(Tried and dropped: cutting a quiet router's long prompt at word starts and encoding the pieces with
`tokenizers` over the cores took 2x tiktoken's time on the GPU host's 16 cores, waking the idle workers.)

A chat resends its earlier messages and tenants share long system prompts: where the tokenizer allows it
(ChatTokenizer.splits_exactly), a prompt is split at its special tokens and the parts are cached (LRU,
CACHE_CHARS of text), so only the parts not seen before are tokenized, with the same ids as the whole.
"""

import asyncio
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from protocol.tokenizer import ChatTokenizer

INLINE_CHARS = 256  # below this, a thread hand-off costs more than tokenizing on the loop
QUIET_S = 0.001  # a prompt arriving this long after the previous one finds the loop idle: tokenized inline
CACHE_CHARS = 4 << 20  # text held by the cache of prompt parts (~10x that in memory with the ids)
PARALLEL_MIN_CPUS = 4  # with fewer, the batch thread's tokenizing competes with the loop for the same cores


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class BatchEncoder:
    def __init__(self, tokenizer: ChatTokenizer, max_batch: int = 64, cache_chars: int = CACHE_CHARS,
                 parallel: bool | None = None):
        """parallel: batches through `tokenizers`, off the GIL (None: where PARALLEL_MIN_CPUS are usable)."""
        self.tokenizer = tokenizer
        self.fast = tokenizer.fast_bpe is not None  # built (and checked against tokenizers) now, not on a request
        self.parallel = _usable_cpus() >= PARALLEL_MIN_CPUS if parallel is None else parallel
        self.max_batch = max_batch
        self.cache_chars = cache_chars if tokenizer.splits_exactly else 0
        self._plain = bool(self.cache_chars)  # texts to tokenize are parts already split at added tokens
        # Ids held as tuples: the collector stops tracking a tuple of ints after its first pass, so the cache
        # (up to millions of ids) adds nothing to the pauses of later collections; lists would be walked each time.
        self._parts: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._cached_chars = 0
        self.parts_hit = self.parts_missed = 0  # prompt parts found in / added to the cache
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._draining = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pdserve-tokenize")
        self._last_arrival = float("-inf")

    async def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens as written in it (the chat template places them). With the
        cache, `text` is split at its added tokens here, and only the parts are tokenized (`plain`)."""
        if not self.cache_chars:
            return (await self._encode([text]))[0]
        return await self.encode_parts(self.tokenizer.split_special(text))

    async def encode_parts(self, parts: list[str | int]) -> list[int]:
        """Token ids of a text already split at its added tokens (ChatTokenizer.split_special or
        render_chat_parts)."""
        if not self.cache_chars:
            texts = [p for p in parts if isinstance(p, str)]
            encoded = iter(await self._encode(texts) if texts else ())
            return [i for p in parts for i in ([p] if isinstance(p, int) else next(encoded))]
        known: dict[str, Sequence[int]] = {}
        for p in parts:
            if isinstance(p, str) and p not in known and (ids := self._parts.get(p)) is not None:
                self._parts.move_to_end(p)
                known[p] = ids
        new = list(dict.fromkeys(p for p in parts if isinstance(p, str) and p not in known))
        self.parts_hit += len(known)
        self.parts_missed += len(new)
        if new:
            for p, ids in zip(new, await self._encode(new), strict=True):
                known[p] = ids
                self._remember(p, ids)
        out: list[int] = []
        for p in parts:
            if isinstance(p, int):
                out.append(p)
            else:
                out += known[p]
        return out

    def _remember(self, part: str, ids: list[int]) -> None:
        if len(part) > self.cache_chars or part in self._parts:
            return
        self._parts[part] = tuple(ids)
        self._cached_chars += len(part)
        while self._cached_chars > self.cache_chars:
            old, _ = self._parts.popitem(last=False)
            self._cached_chars -= len(old)

    async def _encode(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids: on the loop when the router is quiet or the texts are short, else in the thread's
        next batch."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        quiet = now - self._last_arrival > QUIET_S and not self._draining
        self._last_arrival = now
        if quiet or sum(map(len, texts)) < INLINE_CHARS:  # the batch call skips offsets: ~20% faster than encode
            return self.tokenizer.encode_batch(texts, False, plain=self._plain)
        futures = [loop.create_future() for _ in texts]
        self._pending += zip(texts, futures, strict=True)
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        if len(futures) == 1:  # the common case: no gather (a task's cancellation cancels what it awaits)
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                try:
                    results = await loop.run_in_executor(self._executor, self.tokenizer.encode_batch,
                                                         [t for t, _ in batch], False, self.parallel,
                                                         self._plain)
                except Exception as e:  # noqa: BLE001 - every waiter gets the error
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for (_, f), ids in zip(batch, results, strict=True):
                    if not f.done():  # a waiter whose client left was cancelled
                        f.set_result(ids)
        finally:
            self._draining = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
