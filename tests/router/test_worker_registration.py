"""Workers that disagree with the pool are refused; KV events feed the index, with resync."""

import httpx
import pytest

from router.discovery import StaticDiscovery
from router.state import LocalState
from router.workers import WorkerPool

INFO = {"role": "decode", "name": "d", "model": "m", "block_size": 16, "root_hash": 1, "max_model_len": 100,
        "tokenizer_hash": "t"}


async def _pool(handlers: dict) -> tuple[WorkerPool, LocalState]:
    def handle(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        return httpx.Response(200, json=handlers[host](request))

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    state = LocalState(1000)
    pool = WorkerPool(StaticDiscovery([], ["http://a", "http://b"]), client, state)
    await pool.sync()
    return pool, state


def _worker(info: dict, events: dict):
    load = {"running": 0, "waiting": 0, "free_blocks": 1, "total_blocks": 1, "tokens_computed": 0,
            "prompt_tokens_cached": 0}

    def handler(request: httpx.Request) -> dict:
        return {"/info": info, "/tokenizer": {"tokenizer.json": "{}"}, "/load": load,
                "/kv_events": events}[request.url.path]

    return handler


async def test_worker_with_another_block_size_is_refused():
    events = {"seq": 0, "resync": False, "events": []}
    pool, _ = await _pool({"a": _worker(INFO, events), "b": _worker({**INFO, "block_size": 32}, events)})
    for w in pool.workers:
        await pool._refresh(w)
    assert [w.healthy for w in pool.workers] == [True, False]


async def test_kv_events_update_the_index_and_resync_replaces_it():
    events = {"seq": 2, "resync": False, "events": [
        {"seq": 1, "kind": "stored", "block_hashes": [10, 11, 12], "parent_hash": 1},
        {"seq": 2, "kind": "removed", "block_hashes": [12]}]}
    pool, state = await _pool({"a": _worker(INFO, events), "b": _worker(INFO, events)})
    a = pool.workers[0]
    await pool._refresh(a)
    assert state.index.match(a.url, [10, 11, 12]) == 2 and a.events_seq == 2
    events.clear()
    events.update({"seq": 9, "resync": True, "block_hashes": [20], "events": []})
    await pool._refresh(a)
    assert state.index.match(a.url, [10]) == 0 and state.index.match(a.url, [20]) == 1


@pytest.mark.parametrize("field", ["model", "root_hash", "tokenizer_hash"])
async def test_worker_with_another_model_or_tokenizer_is_refused(field):
    events = {"seq": 0, "resync": False, "events": []}
    other = {**INFO, field: "x" if field != "root_hash" else 2}
    pool, _ = await _pool({"a": _worker(INFO, events), "b": _worker(other, events)})
    for w in pool.workers:
        await pool._refresh(w)
    assert not pool.workers[1].healthy
