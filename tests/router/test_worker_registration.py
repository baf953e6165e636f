"""Workers that disagree with the pool are refused; KV events feed the index, with resync."""

import pytest

from protocol.stream_client import StatusError
from router.discovery import StaticDiscovery
from router.state import LocalState
from router.workers import WorkerPool

INFO = {"role": "decode", "name": "d", "model": "m", "block_size": 16, "root_hash": 1, "max_model_len": 100,
        "tokenizer_hash": "t"}


class FakeClient:
    """The pool's client (StreamClient.get_json), answering from handlers: host -> (path -> JSON)."""

    def __init__(self, handlers: dict):
        self.handlers = handlers

    async def get_json(self, url: str, timeout_s: float | None = None):
        host, _, path = url.removeprefix("http://").partition("/")
        answer = self.handlers[host]("/" + path.partition("?")[0])
        if isinstance(answer, int):
            raise StatusError(url, answer, b"refused")
        return answer


async def _pool(handlers: dict) -> tuple[WorkerPool, LocalState]:
    state = LocalState(1000)
    pool = WorkerPool(StaticDiscovery([], ["http://a", "http://b"]), FakeClient(handlers), state)
    await pool.sync()
    return pool, state


def _worker(info: dict, events: dict):
    load = {"running": 0, "waiting": 0, "free_blocks": 1, "total_blocks": 1, "tokens_computed": 0,
            "prompt_tokens_cached": 0}

    def handler(path: str):
        return {"/info": info, "/tokenizer": {"tokenizer.json": "{}"}, "/load": load, "/kv_events": events}[path]

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


@pytest.mark.parametrize("field", ["root_hash", "tokenizer_hash", "block_size"])
async def test_worker_of_a_model_with_another_hash_root_tokenizer_or_block_size_is_refused(field):
    events = {"seq": 0, "resync": False, "events": []}
    other = {**INFO, field: "x" if field == "tokenizer_hash" else 2}
    pool, _ = await _pool({"a": _worker(INFO, events), "b": _worker(other, events)})
    for w in pool.workers:
        await pool._refresh(w)
    assert pool.workers[0].healthy and not pool.workers[1].healthy


async def test_a_worker_of_another_model_registers_as_that_model():
    """Several models behind one router: each model's first worker is its reference; pools are per model."""
    events = {"seq": 0, "resync": False, "events": []}
    other = {**INFO, "model": "other", "root_hash": 2, "tokenizer_hash": "x"}
    pool, _ = await _pool({"a": _worker(INFO, events), "b": _worker(other, events)})
    for w in pool.workers:
        await pool._refresh(w)
    a, b = pool.workers
    assert a.healthy and b.healthy
    assert sorted(pool.references) == sorted([INFO["model"], "other"]) and pool.reference.model == INFO["model"]
    assert pool.pool("decode", "other") == [b] and pool.pool("decode", INFO["model"]) == [a]
    assert pool.pool("decode") == [a, b]


async def test_a_worker_whose_load_poll_fails_leaves_the_pool_until_it_answers_again():
    events = {"seq": 0, "resync": False, "events": []}
    answers = {}
    good = _worker(INFO, events)

    def flaky(path: str):
        return answers.get(path) or good(path)

    pool, _ = await _pool({"a": flaky, "b": good})
    a = pool.workers[0]
    await pool._refresh(a)
    assert a.healthy and pool.pool("decode")[0] is a
    answers["/load"] = 503
    await pool._refresh(a)
    assert not a.healthy and a not in pool.pool("decode")
    del answers["/load"]
    await pool._refresh(a)
    assert a.healthy and a in pool.pool("decode")
