"""The lower tiers of the KV cache. The host tier: blocks evicted from the device pool, kept in (pinned) host
memory under their chained hash, least recently used dropped first; a prefix that runs on past the device
pool's hits into this tier is copied back into device blocks and treated as a hit. The disk tier below it
(optional): what the host tier drops, one file a block, written by a thread off the engine loop; a hit there
is read by another thread while its request waits (other requests go on: `reading`), checked (its hash,
length and checksum), then promoted into the host tier and loaded as a host hit.

Copies go one per run of blocks adjacent on both sides. On a GPU they are queued on the engine's stream
without waiting (pinned memory): an eviction's copy runs before any later kernel can overwrite the block,
and a load's copy before the step that reads it. Offload is inclusive: a block loaded back stays here too,
so evicting it again copies nothing.
"""

import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import torch
import xxhash

log = logging.getLogger("pdserve.engine")
STALE_READ_S = 2.0  # a block read ahead that no admission has asked for this long is dropped (disk tier)


class HostTier:
    def __init__(self, num_blocks: int, pool: torch.Tensor, below: "DiskTier | None" = None):
        """num_blocks of the device pool's block shape, for that pool (the engine's KV tensor); below: the disk
        tier that takes what this one drops."""
        if num_blocks < 1:
            raise ValueError("the host tier needs at least one block")
        self.num_blocks = num_blocks
        self.pool = pool
        self.below = below
        self.store = torch.zeros((num_blocks, *pool.shape[1:]), dtype=pool.dtype, pin_memory=pool.is_cuda)
        self.slots: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, least recently used first
        self.free_slots = list(range(num_blocks - 1, -1, -1))
        self.keep: frozenset[int] = frozenset()  # hashes an admission is about to load: not dropped meanwhile
        self.gone: list[int] = []  # hashes no tier holds any more, not yet reported (take_gone)
        self.pending = False  # an offload copy was queued (a GPU pool: it runs when the stream gets there)
        self.num_loaded = 0  # blocks copied back to the device (hits)

    def reading(self, block_hashes: list[int]) -> bool:
        """Whether blocks of this chain past what is held here are still being read from the disk tier (their
        reads start now if they have not): an admission waits for them rather than read on the engine's loop."""
        if self.below is None:
            return False
        k = 0
        while k < len(block_hashes) and block_hashes[k] in self.slots:
            k += 1
        return self.below.fetch(block_hashes[k : self.num_blocks], self.num_blocks)

    def wait_reads(self, timeout: float) -> None:
        """Block until a disk read finishes (or timeout seconds): an engine with nothing else to run."""
        if self.below is not None:
            self.below.wait_reads(timeout)

    def lookup(self, block_hashes: list[int], disk: bool = True) -> list[int]:
        """Slots of the longest prefix of this hash chain held here (or, past it and with disk, on disk: promoted
        into this tier), made most recently used."""
        found = []
        for h in block_hashes:
            slot = self.slots.get(h)
            if slot is None:
                break
            self.slots.move_to_end(h)
            found.append(slot)
        if disk and self.below is not None and len(found) < len(block_hashes):
            found += self._promote(block_hashes[len(found):], frozenset(block_hashes[: len(found)]))
        return found

    def _promote(self, block_hashes: list[int], keep: frozenset[int]) -> list[int]:
        """Read the disk tier's longest run of this chain into slots (the blocks found before it kept)."""
        slots: list[int] = []
        for h in block_hashes[: self.num_blocks - len(keep)]:
            if h not in self.below:
                break
            if not slots:
                self.settle()  # slots are about to be written from the host: queued copies from them first
            slot = self._take_slot(keep | {x for x in block_hashes[: len(slots)]})
            if slot is None:
                break
            if not self.below.read(h, self.store[slot]):
                self.free_slots.append(slot)
                self.gone.append(h)
                break
            self.slots[h] = slot
            slots.append(slot)
        return slots

    def _take_slot(self, keep: frozenset[int] | set[int]) -> int | None:
        """A free slot, dropping the least recently used block not kept (to the disk tier, if any)."""
        if not self.free_slots and not self._drop_oldest(keep):
            return None
        return self.free_slots.pop()

    def _drop_oldest(self, keep: frozenset[int] | set[int]) -> bool:
        """Drop the least recently used block not kept; False when every block here is kept."""
        old = next((o for o in self.slots if o not in keep), None)
        if old is not None:
            self._drop(old)
        return old is not None

    def _drop(self, h: int) -> None:
        """Free h's slot, the block going down to the disk tier if there is one (else it is gone)."""
        slot = self.slots.pop(h)
        deleted = None
        if self.below is not None:
            self.settle()  # its bytes may still be on their way from the device
            deleted = self.below.write(h, self.store[slot])
        self.gone += [h] if deleted is None else deleted
        self.free_slots.append(slot)

    def take_gone(self) -> list[int]:
        """The hashes gone from every tier since the last call (for the routers: removed)."""
        gone, self.gone = self.gone, []
        return gone

    def offload(self, evicted: list[tuple[int, int]]) -> list[int]:
        """Copy evicted device blocks ((block id, hash) pairs) in; returns the hashes gone from every tier of
        this worker since the last report: those dropped to make room, and an evicted one with no room left."""
        new: dict[int, int] = {}  # hash -> block, those not held here yet
        for block, h in evicted:
            if h in self.slots:
                self.slots.move_to_end(h)
            else:
                new[h] = block
        # Room first, then the copies: a block placed by this call is never dropped by it (to disk) before its
        # bytes are in its slot.
        while len(self.free_slots) < len(new) and self._drop_oldest(self.keep):
            pass
        pairs: list[tuple[int, int]] = []
        for h, block in new.items():
            if not self.free_slots:  # more than this tier holds: straight to disk, or gone
                deleted = self.below.write(h, self.pool[block].cpu()) if self.below is not None else None
                self.gone += [h] if deleted is None else deleted
                continue
            slot = self.free_slots.pop()
            self.slots[h] = slot
            pairs.append((block, slot))
        for src, dst, n in _runs(pairs):
            self.store[dst : dst + n].copy_(self.pool[src : src + n], non_blocking=True)
        self.pending = self.pending or (bool(pairs) and self.pool.is_cuda)
        return self.take_gone()

    def load(self, slots: list[int], block_ids: list[int]) -> None:
        """Copy held blocks back into device blocks (queued before the step that reads them)."""
        for src, dst, n in _runs(list(zip(slots, block_ids, strict=True))):
            self.pool[dst : dst + n].copy_(self.store[src : src + n], non_blocking=True)
        self.num_loaded += len(slots)
        self.pending = self.pending or (bool(slots) and self.pool.is_cuda)  # a slot is not rewritten before

    def settle(self) -> None:
        """Wait for queued copies: before blocks just evicted are written from outside the stream (a KV
        transfer), and before a slot is read or written by the host (the disk tier)."""
        if self.pending:
            torch.cuda.current_stream(self.pool.device).synchronize()
            self.pending = False


_HEADER = struct.Struct("<8sQQQQ")  # magic, the tier's tag, block hash, payload bytes, xxh64 of the payload
_MAGIC = b"PDSKV001"


class DiskTier:
    """One file a block in a directory (NVMe in production), least recently used deleted first. A file holds a
    header (this tier's tag: model, weights and layout; the block's hash; the payload's length and checksum)
    and the block's bytes. Writes go to a thread, and reads ahead of their use (`fetch`) to another; a read
    checks the header and the checksum, and a block that fails is deleted (it is then computed, never served). A worker that restarts on the same directory keeps
    the valid blocks of the same tag (`held()`: announced to the routers as held, in a lower tier) and deletes
    the rest. A directory that cannot be written (full, read-only) turns the tier off, logged once."""

    def __init__(self, directory: str | Path, num_blocks: int, block_bytes: int, tag: int):
        if num_blocks < 1:
            raise ValueError("the disk tier needs room for at least one block")
        self.dir = Path(directory)
        self.num_blocks, self.block_bytes, self.tag = num_blocks, block_bytes, tag
        self.files: OrderedDict[int, None] = OrderedDict()  # hashes on disk (or being written), LRU first
        self.writing: dict[int, bytes] = {}  # blocks queued for the writer (read from here meanwhile)
        self._lock = threading.Lock()  # `writing` is changed by both threads
        self.broken: str | None = None  # why the tier is off (set by either thread, read by the loop)
        self.num_corrupt = 0
        self._writes: queue.Queue = queue.Queue()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kv-disk-read")
        # Blocks read ahead of their use (their payload, None: it failed) -> the read and when it was last wanted
        self.reads: dict[int, tuple[Future, float]] = {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._scan()
        except OSError as e:
            self._fail(e)
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-tier", daemon=True)
        self._writer.start()

    def _path(self, h: int) -> Path:
        return self.dir / f"{h:016x}.kv"

    def _scan(self) -> None:
        """Index the files a previous process left that this one can use, oldest first; delete the others."""
        found = []
        for p in self.dir.glob("*.kv"):
            try:
                with open(p, "rb") as f:
                    magic, tag, h, length, _ = _HEADER.unpack(f.read(_HEADER.size))
                ok = magic == _MAGIC and tag == self.tag and length == self.block_bytes and p.name == f"{h:016x}.kv"
                ok = ok and p.stat().st_size == _HEADER.size + length
            except (OSError, struct.error):
                ok = False
            if ok:
                found.append((p.stat().st_mtime, h))
            else:
                p.unlink(missing_ok=True)
        for _, h in sorted(found)[-self.num_blocks:]:
            self.files[h] = None
        for p in self.dir.glob("*.kv"):
            if int(p.stem, 16) not in self.files:
                p.unlink(missing_ok=True)
        for p in self.dir.glob("*.tmp"):  # a write a crash cut short
            p.unlink(missing_ok=True)

    def held(self) -> list[int]:
        return list(self.files)

    def __contains__(self, h: int) -> bool:
        return h in self.files

    def write(self, h: int, block: torch.Tensor) -> list[int] | None:
        """Keep a block the host tier drops (its bytes copied now, written by the thread): the hashes deleted to
        make room, or None when the tier is off (the block is not kept)."""
        if self.broken is not None:
            return None
        if h in self.files:
            self.files.move_to_end(h)
            return []
        deleted = []
        while len(self.files) >= self.num_blocks:
            old, _ = self.files.popitem(last=False)
            self.reads.pop(old, None)
            self._writes.put(("delete", old, None))
            deleted.append(old)
        self.files[h] = None
        data = block.contiguous().view(torch.uint8).numpy().tobytes()
        with self._lock:
            self.writing[h] = data
        self._writes.put(("write", h, data))
        return deleted

    def fetch(self, hashes: list[int], keep: int) -> bool:
        """Start reading the longest run of this chain held here on the reader thread (made most recently
        used: no write drops it meanwhile); True while any of it is still being read, or waits to be. What is
        read waits for read(). At most `keep` blocks are read or being read at once, and a run starts whole or
        not at all (two runs never hold each other's room): one that does not fit waits until read blocks are
        taken, or dropped once no call has wanted them for STALE_READ_S (their request went away)."""
        run = []
        for h in hashes:
            if h not in self.files:
                break
            self.files.move_to_end(h)
            run.append(h)
        now = time.monotonic()
        busy, missing = False, []
        for h in run:
            got = self.reads.get(h)
            if got is not None:
                self.reads[h] = (got[0], now)
                busy = busy or not got[0].done()
                continue
            with self._lock:
                if h in self.writing:  # its bytes are still in memory: read() takes them at once
                    continue
            missing.append(h)
        if not missing:
            return busy
        if len(self.reads) + len(missing) > keep:
            for x in [x for x, (f, t) in self.reads.items() if f.done() and now - t > STALE_READ_S]:
                del self.reads[x]
            if len(self.reads) + len(missing) > keep:
                return True
        for h in missing:
            self.reads[h] = (self._reader.submit(self._load, h), now)
        return True

    def wait_reads(self, timeout: float) -> None:
        wait([f for f, _ in self.reads.values() if not f.done()], timeout, FIRST_COMPLETED)

    def _load(self, h: int) -> memoryview | None:
        """Block h's payload from its file, checked (None: missing or failed)."""
        try:
            with open(self._path(h), "rb") as f:
                raw = f.read()
            magic, tag, hh, length, digest = _HEADER.unpack_from(raw)
            payload = memoryview(raw)[_HEADER.size:]
            ok = (magic, tag, hh, length) == (_MAGIC, self.tag, h, self.block_bytes) and \
                len(payload) == length and xxhash.xxh64_intdigest(payload) == digest
        except (OSError, struct.error):
            return None
        return payload if ok else None

    def read(self, h: int, out: torch.Tensor) -> bool:
        """Copy block h into out (a host tier slot) after checking it; False (and the file gone) if it fails.
        A block fetched ahead is taken from its read (waiting for it, if it is still going)."""
        ahead = self.reads.pop(h, None)
        with self._lock:
            payload = self.writing.get(h)  # not on disk yet: the bytes it was given
        if payload is None:
            payload = ahead[0].result() if ahead is not None else self._load(h)
            if payload is None:
                if self.broken is None:  # a tier that broke lost its unwritten blocks: no news
                    self.num_corrupt += 1
                    log.warning("KV disk tier: block %016x failed its check; deleted (it will be computed)", h)
                self.files.pop(h, None)
                self._writes.put(("delete", h, None))
                return False
        out.view(torch.uint8).view(-1).copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        self.files.move_to_end(h)
        return True

    def flush(self) -> None:
        """Wait until what was queued is on disk (tests, shutdown)."""
        while self.writing and self._writer.is_alive():
            threading.Event().wait(0.005)

    def close(self) -> None:
        self.flush()
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._writes.put(None)
        self._writer.join(timeout=10)

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            op, h, data = item
            try:
                if op == "delete":
                    self._path(h).unlink(missing_ok=True)
                elif self.broken is None:
                    tmp = self._path(h).with_suffix(".tmp")
                    with open(tmp, "wb") as f:
                        f.write(_HEADER.pack(_MAGIC, self.tag, h, len(data), xxhash.xxh64_intdigest(data)))
                        f.write(data)
                    os.replace(tmp, self._path(h))
            except OSError as e:
                self._fail(e)
            finally:
                if op == "write":
                    with self._lock:
                        if self.writing.get(h) is data:  # not given again since
                            del self.writing[h]

    def _fail(self, e: OSError) -> None:
        if self.broken is None:
            self.broken = f"{type(e).__name__}: {e}"
            log.error("KV disk tier at %s turned off: %s (the host tier goes on alone)", self.dir, self.broken)


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(src, dst) index pairs as runs (src start, dst start, length) adjacent on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in pairs:
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
