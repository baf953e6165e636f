"""The worker's KV event log: numbered events for routers, and the cache they describe to resync from.

The frontend keeps it from the engine core's Step messages, which carry every event since the engine
started: the set of cached block hashes it keeps from them is the engine's own, and a router that missed
events gets that set without waiting for the engine's next step."""

import os
from collections import deque

from protocol.kv_events import KVEvent, KVEventKind

MAX_EVENTS = 10_000


class EventLog:
    def __init__(self) -> None:
        # This log's identity: a restarted worker (same URL, an empty cache, numbering from 0 again) has another,
        # so a router drops what it knew of the old one instead of reading the new one's events as its sequel.
        self.instance = os.urandom(8).hex()
        self.seq = 0  # number of the last event
        self.events: deque[tuple[int, KVEvent]] = deque(maxlen=MAX_EVENTS)
        self.cached: dict[int, None] = {}  # every block hash held now, as the events tell

    def extend(self, events: list[KVEvent]) -> None:
        for e in events:
            self.seq += 1
            self.events.append((self.seq, e))
            if e.kind is KVEventKind.STORED:
                self.cached.update(dict.fromkeys(e.block_hashes))
            elif e.kind is KVEventKind.REMOVED:
                for h in e.block_hashes:
                    self.cached.pop(h, None)
            elif e.kind is KVEventKind.CLEARED:
                self.cached.clear()  # (OFFLOADED: still held, in a lower tier)

    def since(self, seq: int) -> list[tuple[int, KVEvent]] | None:
        """Events after `seq`, or None when some were dropped (the caller must resync from the snapshot)."""
        if seq >= self.seq:
            return [] if seq == self.seq else None  # a newer seq than ours: we restarted
        oldest = self.events[0][0] if self.events else self.seq + 1
        if seq + 1 < oldest:
            return None
        return [(s, e) for s, e in self.events if s > seq]

    def snapshot(self) -> tuple[int, list[int]]:
        """(the last event's number, every block hash held after it)."""
        return self.seq, list(self.cached)
