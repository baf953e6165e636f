"""KV transfer through NIXL (UCX backend): GPU pools on one host (cuda_ipc) or across hosts (RDMA).

NIXL's cost is per descriptor, not per byte (~13 us each on the lent H100, whatever its size), so this
transport engineers the number of descriptors:

- Registration and descriptor lists happen once: the pool is registered as one region, and one prepped
  descriptor list (one entry per block, all layers: the pool is block-major) is made for this pool and for
  each peer's pool at connect time. A request only names block indices (`make_prepped_xfer`), and NIXL
  merges indices that are adjacent on both sides into one descriptor.
- Adjacent-on-both-sides is what decides the cost. The decode side reserves a contiguous run of blocks
  where it can (`BlockPool.allocate_run`); when the source blocks are scattered but the destination is
  contiguous, the sender gathers them into a registered staging buffer (one pass over HBM, a fast
  index_select) and writes the staging buffer as one descriptor. The staging buffer is split in two, so the
  gather of one half overlaps the transfer of the other.
- Preparing a transfer from a list of block indices costs even when NIXL merges them into one descriptor
  (~0.3 ms for 64 indices on the H100: 59-71% of a reposted handle for a fully contiguous write). So there
  are coarse lists too: the staging halves, and each peer's pool in chunks of one staging half. A staged
  write of a full half into a destination run that starts on a chunk boundary (`BlockPool.allocate_run`
  aligns reservations to `RUN_ALIGN` blocks, the default half) is one index on each side, and its transfer
  handle is kept and posted again the next time the same half goes to the same chunk (at most two handles
  a chunk of the peer's pool; released at close).

Writes are one-sided (the receiver's CPU does nothing); `write_blocks` returns once the bytes have landed.
A peer that dies or stalls ends in TransferError after the timeout; the handle is released either way.
"""

import base64
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kv_transfer.descriptors import (
    WHOLE_BLOCKS_ONLY,
    HeadSlice,
    PoolDescriptor,
    TransferError,
    block_runs,
    check_peer,
)

log = logging.getLogger("pdserve.kv_transfer")
PREFIX = "nixl:"


def _runs(ids: list[int]) -> int:
    return sum(1 for i, b in enumerate(ids) if i == 0 or b != ids[i - 1] + 1)


@dataclass
class _Peer:
    name: str  # NIXL's name for the remote agent
    blocks: int
    dlist: object  # prepped: one entry a block
    chunks: object | None  # prepped: one entry a staging half's worth of blocks, from block 0
    address: str  # as the peer published it: a restarted peer publishes a new one
    handles: dict[tuple[int, int], object] = field(default_factory=dict)  # (half, chunk) -> posted before


class NixlTransport:
    def __init__(self, agent: str, staging_blocks: int = 128, backends: tuple[str, ...] = ("UCX",)):
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except ImportError as e:
            raise TransferError("the nixl transport needs the `nixl` package (pip install nixl)") from e
        self.agent = agent
        self.nixl = nixl_agent(agent, nixl_agent_config(backends=list(backends)))
        self.staging_blocks = staging_blocks
        self.pool: torch.Tensor | None = None
        self.descriptor: PoolDescriptor | None = None
        self.peers: dict[str, _Peer] = {}
        self.peer_addresses: dict[str, dict] = {}  # agent -> its published address (base pointer, stride, ...)
        self.retired: set[str] = set()  # addresses of peers that restarted since
        self._lock = threading.Lock()
        self._regs: list = []
        self._dlists: list = []

    # --- registration, once per pool ---

    def _mem(self, t: torch.Tensor) -> tuple[str, int]:
        return ("VRAM", t.device.index or 0) if t.is_cuda else ("DRAM", 0)

    def _block_rows(self, base: int, stride: int, count: int, device: int) -> np.ndarray:
        rows = np.empty((count, 3), dtype=np.int64)
        rows[:, 0] = base + stride * np.arange(count, dtype=np.int64)
        rows[:, 1] = stride
        rows[:, 2] = device
        return rows

    def register_pool(self, pool: torch.Tensor, descriptor: PoolDescriptor) -> PoolDescriptor:
        if not pool.is_contiguous():
            raise TransferError("the KV pool must be one contiguous tensor")
        self.pool = pool
        mem, device = self._mem(pool)
        stride = pool[0].numel() * pool.element_size()
        self._regs.append(self.nixl.register_memory([pool]))
        self.local = self.nixl.prep_xfer_dlist("NIXL_INIT_AGENT",
                                              self._block_rows(pool.data_ptr(), stride, pool.shape[0], device), mem)
        self._dlists.append(self.local)
        self.staging = None
        if self.staging_blocks > 1:
            self.staging = torch.empty((self.staging_blocks, *pool.shape[1:]), dtype=pool.dtype, device=pool.device)
            # Gathers copy whole blocks as wide words (faster than the KV dtype), on a stream of their own so
            # they never wait behind the engine's compute.
            wide = torch.int64 if stride % 8 == 0 else torch.uint8
            self._pool_words = pool.view(pool.shape[0], -1).view(wide)
            self._staging_words = self.staging.view(self.staging_blocks, -1).view(wide)
            self._gather_stream = torch.cuda.Stream(pool.device) if pool.is_cuda else None
            self._regs.append(self.nixl.register_memory([self.staging]))
            self.staging_list = self.nixl.prep_xfer_dlist(
                "NIXL_INIT_AGENT", self._block_rows(self.staging.data_ptr(), stride, self.staging_blocks, device), mem)
            self._dlists.append(self.staging_list)
            half = self.staging_blocks // 2
            self.staging_halves = self.nixl.prep_xfer_dlist(
                "NIXL_INIT_AGENT", self._block_rows(self.staging.data_ptr(), stride * half, 2, device), mem)
            self._dlists.append(self.staging_halves)
        address = {"metadata": base64.b64encode(self.nixl.get_agent_metadata()).decode(), "base": pool.data_ptr(),
                   "stride": stride, "blocks": pool.shape[0], "device": device, "mem": mem}
        self.descriptor = PoolDescriptor(**(descriptor.to_dict() | {"address": PREFIX + json.dumps(address)}))
        return self.descriptor

    def connect(self, peer: PoolDescriptor) -> None:
        check_peer(self.descriptor, peer)
        with self._lock:  # connects come from several transfer threads
            self._connect(peer)

    def _connect(self, peer: PoolDescriptor) -> None:
        if peer.address in self.retired:
            raise TransferError(f"peer {peer.agent} restarted: this request's blocks were in its old pool")
        known = self.peers.get(peer.agent)
        if known is not None:
            if known.address == peer.address:
                return
            # The peer restarted (a new process under the same name): what was prepared for the old one goes.
            log.info("peer %s published new NIXL metadata (restarted); reconnecting", peer.agent)
            self.retired.add(known.address)
            self._drop(peer.agent)
        if not peer.address.startswith(PREFIX):
            raise TransferError(f"peer {peer.agent} published no NIXL metadata")
        try:
            a = json.loads(peer.address[len(PREFIX):])
            name = self.nixl.add_remote_agent(base64.b64decode(a["metadata"]))
            remote = self.nixl.prep_xfer_dlist(name, self._block_rows(a["base"], a["stride"], a["blocks"], a["device"]),
                                               a["mem"])
            half = self.staging_blocks // 2
            chunks = None if self.staging is None else self.nixl.prep_xfer_dlist(
                name, self._block_rows(a["base"], a["stride"] * half, a["blocks"] // half, a["device"]), a["mem"])
        except (KeyError, ValueError) as e:
            raise TransferError(f"bad NIXL metadata from {peer.agent}: {e}") from e
        except Exception as e:  # nixl raises its own exception types for unreachable or foreign agents
            raise TransferError(f"cannot connect to {peer.agent} through NIXL: {e}") from e
        if a["stride"] != self.pool[0].numel() * self.pool.element_size():
            raise TransferError(f"peer {peer.agent}'s blocks are {a['stride']} bytes, ours differ")
        self.peers[peer.agent] = _Peer(name, a["blocks"], remote, chunks, peer.address)
        self.peer_addresses[peer.agent] = a

    # --- per request: block indices only ---

    def _target(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int]) -> _Peer:
        """The peer, once the block ids are checked against its pool."""
        if peer not in self.peers:
            raise TransferError(f"not connected to {peer}")
        p = self.peers[peer]
        if len(src_block_ids) != len(dst_block_ids):
            raise TransferError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destination blocks")
        if any(b < 0 or b >= p.blocks - 1 for b in dst_block_ids):
            raise TransferError(f"destination block ids out of range [0, {p.blocks - 1})")
        return p

    def write_blocks(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int],
                     timeout_s: float = 30.0, heads: HeadSlice | None = None) -> None:
        if heads is not None:
            raise TransferError(WHOLE_BLOCKS_ONLY)
        p = self._target(peer, src_block_ids, dst_block_ids)
        if not src_block_ids:
            return
        deadline = time.monotonic() + timeout_s
        direct = len(block_runs(src_block_ids, dst_block_ids))
        if self.staging is None or direct <= 2 * _runs(dst_block_ids):
            self._wait(self._post(self.local, src_block_ids, p.dlist, dst_block_ids, p.name), deadline)
        else:
            self._write_staged(src_block_ids, dst_block_ids, p, deadline)

    def start_write(self, peer: str, src_block_ids: list[int], dst_block_ids: list[int]):
        """Post a write of blocks and return at once (streaming a prefill chunk by chunk); `finish` waits."""
        p = self._target(peer, src_block_ids, dst_block_ids)
        return self._post(self.local, src_block_ids, p.dlist, dst_block_ids, p.name)

    def finish(self, pending: list, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        for i, handle in enumerate(pending):
            try:
                self._wait(handle, deadline)
            except BaseException:
                for h in pending[i + 1 :]:
                    self._release(h)
                raise

    def _write_staged(self, src: list[int], dst: list[int], p: _Peer, deadline: float) -> None:
        """Gather into one half of the staging buffer while the other half is on the wire."""
        half = self.staging_blocks // 2
        cuda = self.pool.is_cuda
        if cuda:
            torch.cuda.current_stream(self.pool.device).synchronize()  # the KV is computed before it is read
        src_t = torch.tensor(src, dtype=torch.long, device=self.pool.device)
        in_flight: list = [None, None]  # per half: (handle, (half, chunk) if it is a kept one)
        try:
            for k, start in enumerate(range(0, len(src), half)):
                n = min(half, len(src) - start)
                buf = (k % 2) * half
                if in_flight[k % 2] is not None:
                    self._wait_staged(p, *in_flight[k % 2], deadline)
                    in_flight[k % 2] = None
                if cuda:
                    with torch.cuda.stream(self._gather_stream):
                        torch.index_select(self._pool_words, 0, src_t[start : start + n],
                                           out=self._staging_words[buf : buf + n])
                    self._gather_stream.synchronize()  # gathered before NIXL reads it
                else:
                    torch.index_select(self._pool_words, 0, src_t[start : start + n],
                                       out=self._staging_words[buf : buf + n])
                d0 = dst[start]
                if n == half and d0 % half == 0 and dst[start : start + n] == list(range(d0, d0 + n)):
                    key = (k % 2, d0 // half)  # a whole chunk of the peer's pool: one index a side
                    in_flight[k % 2] = (self._post(self.staging_halves, [key[0]], p.chunks, [key[1]], p.name,
                                                   synced=True, handle=p.handles.pop(key, None)), key)
                else:
                    in_flight[k % 2] = (self._post(self.staging_list, list(range(buf, buf + n)), p.dlist,
                                                   dst[start : start + n], p.name, synced=True), None)
            for i, f in enumerate(in_flight):
                if f is not None:
                    in_flight[i] = None
                    self._wait_staged(p, *f, deadline)
        except BaseException:
            for f in in_flight:
                if f is not None:
                    self._release(f[0])  # abandoned: not kept
            raise

    def _wait_staged(self, p: _Peer, handle, key: tuple[int, int] | None, deadline: float) -> None:
        if key is None:
            self._wait(handle, deadline)
            return
        self._wait(handle, deadline, release=False)  # raises (and releases it) on error or timeout
        p.handles[key] = handle  # done: kept for the next post of this half to this chunk

    def _post(self, local, local_ids: list[int], remote, remote_ids: list[int], name: str, synced: bool = False,
              handle=None):
        """Post a write (with `handle`: one kept from an earlier post of the same indices)."""
        if self.pool.is_cuda and not synced:
            torch.cuda.current_stream(self.pool.device).synchronize()  # the KV is computed before it is read
        try:
            if handle is None:
                handle = self.nixl.make_prepped_xfer("WRITE", local, local_ids, remote, remote_ids)
            state = self.nixl.transfer(handle)
        except Exception as e:
            if handle is not None:
                self._release(handle)
            raise TransferError(f"NIXL refused the transfer to {name}: {e}") from e
        if state == "ERR":
            self._release(handle)
            raise TransferError(f"NIXL transfer to {name} failed to start")
        return handle

    def _wait(self, handle, deadline: float, release: bool = True) -> None:
        """Until the transfer is done; the handle is released after (always, when it fails)."""
        ok = False
        try:
            while True:
                state = self.nixl.check_xfer_state(handle)
                if state == "DONE":
                    ok = True
                    return
                if state == "ERR":
                    raise TransferError("NIXL transfer failed (is the peer gone?)")
                if time.monotonic() > deadline:
                    raise TransferError("NIXL transfer timed out")
                time.sleep(0)  # yield the GIL; completion takes micro- to milliseconds
        finally:
            if release or not ok:
                self._release(handle)

    def _release(self, handle) -> None:
        try:
            self.nixl.release_xfer_handle(handle)
        except Exception as e:  # a transfer still in progress cannot be released; NIXL keeps it
            log.warning("could not release a NIXL transfer handle: %s", e)

    def _drop(self, agent: str) -> None:
        """Forget a peer: its posted handles, its prepared lists and its agent (best effort: it may be gone)."""
        p = self.peers.pop(agent)
        self.peer_addresses.pop(agent, None)
        for h in p.handles.values():
            self._release(h)
        for d in (p.dlist, p.chunks):
            if d is not None:
                try:
                    self.nixl.release_dlist_handle(d)
                except Exception as e:  # noqa: BLE001
                    log.debug("release_dlist_handle: %s", e)
        try:
            self.nixl.remove_remote_agent(p.name)
        except Exception as e:  # noqa: BLE001
            log.debug("remove_remote_agent: %s", e)

    def close(self) -> None:
        for agent in list(self.peers):
            self._drop(agent)
        for d in self._dlists:
            try:
                self.nixl.release_dlist_handle(d)
            except Exception as e:  # noqa: BLE001 - best effort at shutdown
                log.debug("release_dlist_handle: %s", e)
        for r in self._regs:
            try:
                self.nixl.deregister_memory(r)
            except Exception as e:  # noqa: BLE001
                log.debug("deregister_memory: %s", e)
        self._dlists, self._regs, self.peers = [], [], {}
