"""The worker's KV event log: numbered events for routers, with a snapshot to resync from."""

import threading
from collections import deque

from protocol.kv_events import KVEvent

MAX_EVENTS = 10_000


class EventLog:
    def __init__(self) -> None:
        self.seq = 0  # number of the last event
        self.events: deque[tuple[int, KVEvent]] = deque(maxlen=MAX_EVENTS)
        self._lock = threading.Lock()  # the engine thread appends, the server's loop reads

    def extend(self, events: list[KVEvent]) -> None:
        with self._lock:
            for e in events:
                self.seq += 1
                self.events.append((self.seq, e))

    def since(self, seq: int) -> list[tuple[int, KVEvent]] | None:
        """Events after `seq`, or None when some were dropped (the caller must resync from a snapshot)."""
        with self._lock:
            if seq >= self.seq:
                return [] if seq == self.seq else None  # a newer seq than ours: we restarted
            oldest = self.events[0][0] if self.events else self.seq + 1
            if seq + 1 < oldest:
                return None
            return [(s, e) for s, e in self.events if s > seq]
