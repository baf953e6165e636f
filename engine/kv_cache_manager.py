"""Blocks per request on top of the block pool: prefix hits at admission (in the pool, then in the host tier
below it), growth, commit of full blocks."""

from engine.block_pool import BlockPool
from engine.kv_tiers import HostTier
from engine.request import Request
from protocol.block_hash import hash_blocks

LOADING = 0  # admit(): the request's prefix is being read from a lower tier; it waits, others may go first


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, root_hash: int, tier: HostTier | None = None):
        self.pool = pool
        self.block_size = block_size
        self.root_hash = root_hash
        self.tier = tier
        self.num_hit_tokens = 0  # prompt tokens found in the prefix cache (any tier), over all requests
        self.num_tier_hit_tokens = 0  # of which the host tier held

    def _root(self, req: Request) -> int:
        """The root of the request's block hash chain: the model's, or its adapter's (never shared)."""
        return self.root_hash if req.root_hash is None else req.root_hash

    def _hashes_upto(self, req: Request, num_blocks: int) -> list[int]:
        """req.block_hashes extended to cover its first num_blocks full blocks."""
        have = len(req.block_hashes)
        if have < num_blocks:
            parent = req.block_hashes[-1] if have else self._root(req)
            tokens = req.token_slice(have * self.block_size, num_blocks * self.block_size)
            req.block_hashes.extend(hash_blocks(tokens, self.block_size, parent))
        return req.block_hashes[:num_blocks]

    def admit(self, req: Request, token_budget: int) -> int | None:
        """Give a waiting request its cached prefix and blocks for its next chunk.

        Returns the number of new tokens to compute this step, None when the blocks are not there, or LOADING
        while blocks of its prefix are read from disk (off the loop). At least the last prompt token is always
        computed, to produce logits.
        """
        bs = self.block_size
        hashes, hits = self._cached_prefix(req)
        if hits is None:  # (full blocks are still registered as they fill)
            req.prompt_logprobs = []
            hits, lower = [], []
        else:
            if self.tier is not None and self.tier.reading(hashes[len(hits):]):
                return LOADING
            lower = self.tier.lookup(hashes[len(hits):]) if self.tier is not None else []
        num_cached = (len(hits) + len(lower)) * bs
        num_new = min(req.num_tokens - num_cached, token_budget)
        needed = blocks_for(num_cached + num_new, bs) - len(hits)
        hits_on_free_list = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        if needed + hits_on_free_list > self.pool.num_free_blocks:
            return None
        self.pool.take(hits)
        req.block_ids = hits + self._allocate(req, hashes, len(hits), lower, needed)
        req.num_computed_tokens = num_cached
        req.num_committed_blocks = len(hits) + len(lower)
        if req.num_preemptions == 0:
            req.num_cached_tokens = num_cached
            self.num_hit_tokens += num_cached
            self.num_tier_hit_tokens += len(lower) * bs
        return num_new

    def _allocate(self, req: Request, hashes: list[int], num_hits: int, lower: list[int], needed: int,
                  run: bool = False) -> list[int]:
        """needed new blocks, the first len(lower) filled from the host tier's slots `lower` (which hold
        hashes[num_hits:]) and registered in the pool's cache as any computed block."""
        if self.tier is not None:
            self.pool.report_removed(self.tier.take_gone())  # what its lookup dropped or found corrupt
        if not lower:
            return (run and self.pool.allocate_run(needed)) or self.pool.allocate(needed)
        loaded = hashes[num_hits : num_hits + len(lower)]
        self.tier.keep = frozenset(loaded)  # what this allocation evicts may not push them out
        try:
            blocks = (run and self.pool.allocate_run(needed)) or self.pool.allocate(needed)
        finally:
            self.tier.keep = frozenset()
        self.tier.load(lower, blocks[: len(lower)])
        self.pool.cache_blocks(blocks[: len(lower)], loaded, hashes[num_hits - 1] if num_hits else self._root(req))
        return blocks

    def reserve(self, req: Request) -> bool:
        """Blocks for a whole prompt (with any outputs resumed after it) whose KV a prefill worker will write;
        cached leading blocks are reused.

        Sets req.num_cached_tokens to what is already here (the prefill worker sends only the rest).
        """
        bs = self.block_size
        hashes = self._hashes_upto(req, req.num_tokens // bs)
        hits = self.pool.lookup_prefix(hashes)
        lower = []
        if self.tier is not None:  # (blocks still being read from disk are not waited for: they are sent)
            lower = self.tier.lookup(hashes[len(hits):], disk=not self.tier.reading(hashes[len(hits):]))
        needed = blocks_for(req.num_tokens, bs) - len(hits)
        if needed + sum(1 for b in hits if self.pool.ref_counts[b] == 0) > self.pool.num_free_blocks:
            return False
        self.pool.take(hits)
        # Adjacent blocks where possible: the prefill worker then writes them as one run.
        req.block_ids = hits + self._allocate(req, hashes, len(hits), lower, needed, run=True)
        if self.tier is not None:
            self.tier.settle()  # what this evicted is copied out before the prefill worker writes there
        req.num_cached_tokens = (len(hits) + len(lower)) * bs
        req.num_committed_blocks = len(hits) + len(lower)
        self.num_hit_tokens += req.num_cached_tokens
        self.num_tier_hit_tokens += len(lower) * bs
        return True

    def loading(self, req: Request) -> bool:
        """Whether blocks of a waiting request's prefix are being read from disk (their reads start now if they
        have not): admit() would answer LOADING, it cannot run yet."""
        if self.tier is None:
            return False
        hashes, hits = self._cached_prefix(req)
        return hits is not None and self.tier.reading(hashes[len(hits):])

    def _cached_prefix(self, req: Request) -> tuple[list[int], list[int] | None]:
        """A waiting request's block hashes (every full block before its last token's) and the pool's cached
        prefix of them; None for a prompt whose logprobs are wanted: they come from computing every prompt
        token, so nothing is taken from a cache."""
        hashes = self._hashes_upto(req, (req.num_tokens - 1) // self.block_size)
        if req.params.prompt_logprobs is not None and not req.output_token_ids:
            return hashes, None
        return hashes, self.pool.lookup_prefix(hashes)

    def wait_reads(self, timeout: float) -> None:
        """Block until a lower tier's read finishes, or timeout seconds (nothing else to run meanwhile)."""
        if self.tier is not None:
            self.tier.wait_reads(timeout)

    def grow(self, req: Request, num_new_tokens: int) -> bool:
        """Blocks for num_new_tokens more tokens of a running request; False when the pool is out."""
        needed = blocks_for(req.num_computed_tokens + num_new_tokens, self.block_size) - len(req.block_ids)
        if needed <= 0:
            return True
        if needed > self.pool.num_free_blocks:
            return False
        req.block_ids.extend(self.pool.allocate(needed))
        return True

    def commit(self, req: Request) -> None:
        """Register the blocks that became full in the prefix cache."""
        full = req.num_computed_tokens // self.block_size
        start = req.num_committed_blocks
        if full <= start:
            return
        hashes = self._hashes_upto(req, full)
        parent = hashes[start - 1] if start else self._root(req)
        self.pool.cache_blocks(req.block_ids[start:full], hashes[start:full], parent)
        req.num_committed_blocks = full

    def free(self, req: Request) -> None:
        self.pool.release(req.block_ids)
        req.block_ids = []
        req.num_committed_blocks = 0
