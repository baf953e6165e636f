"""The prefill worker's handshake (prefill_worker/app.py): /prefill (from the router) and /send (from the decode
worker) meet whichever comes first; an abort that overtakes its /prefill refuses it; a half whose other half
never arrives gives up after the transfer timeout. Whatever happens, the held blocks are released, no
rendezvous entry is left behind and no output future waits."""

import asyncio
from types import SimpleNamespace

import httpx
import pytest

from prefill_worker.app import create_app
from worker.ipc import Out, Step

TIMEOUT_S = 0.5


class FakeCore:
    """The EngineClient surface the prefill app uses, recording what reaches the core."""

    def __init__(self):
        self.added, self.aborted, self.released, self.sent = [], [], [], []

    def add(self, rid, prompt, params, hold_kv=False, resumed=None):
        assert hold_kv
        self.added.append(rid)

    def abort(self, rid):
        self.aborted.append(rid)

    def release(self, rid):
        self.released.append(rid)

    async def send_kv(self, rid, dests, dst_block_ids, skip_blocks, timeout):
        self.sent.append(rid)


@pytest.fixture
def worker():
    fe = SimpleNamespace(config=SimpleNamespace(name="p", role="prefill", transfer_timeout_s=TIMEOUT_S),
                         client=FakeCore(), error=None, draining=False, handler=None, load=None, tracer=None)
    app = create_app(fe)
    return fe, app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p")


def _prefill(http, rid="r"):
    return http.post("/prefill", json={"request_id": rid, "prompt_token_ids": [1, 2, 3],
                                       "params": {"max_tokens": 1, "temperature": 0}})


def _send(http, rid="r"):
    return http.post("/send", json={"request_id": rid, "dest": {}, "dst_block_ids": [4, 5], "skip_blocks": 0})


async def _computed(fe, rid="r", token=42):
    """The core finishes the prefill: its one output, as a step brings it."""
    for _ in range(100):
        if rid in fe.handler.outputs:
            break
        await asyncio.sleep(0.01)
    fe.handler.on_step(Step([Out(rid, [token], 1, 0, 3, "length")]))


def _clean(fe) -> None:
    assert fe.handler.pending == {} and fe.handler.outputs == {}


@pytest.mark.parametrize("send_first", [False, True])
async def test_the_two_halves_meet_whichever_comes_first(worker, send_first):
    fe, _, http = worker
    first = asyncio.ensure_future(_send(http) if send_first else _prefill(http))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(_prefill(http) if send_first else _send(http))
    await _computed(fe)
    sent, prefilled = (await first, await second) if send_first else (await second, await first)
    assert prefilled.status_code == 200 and sent.status_code == 200, (prefilled.text, sent.text)
    assert sent.json()["first_token"] == 42 and fe.client.sent == ["r"] and fe.client.released == ["r"]
    _clean(fe)


async def test_an_abort_that_overtakes_its_prefill_refuses_it_and_fails_a_waiting_send(worker):
    fe, _, http = worker
    send = asyncio.ensure_future(_send(http))
    await asyncio.sleep(0.05)
    assert (await http.post("/abort/r")).status_code == 200
    assert (await send).status_code == 400  # at once, not at its timeout
    await http.post("/abort/r3")  # before its /prefill
    refused = await _prefill(http, "r3")
    assert refused.status_code == 409 and "r3" not in fe.client.added
    _clean(fe)


async def test_a_prefill_whose_send_never_comes_gives_up_and_releases(worker):
    fe, _, http = worker
    pending = asyncio.ensure_future(_prefill(http))
    await _computed(fe)
    r = await asyncio.wait_for(pending, 5 * TIMEOUT_S)
    assert r.status_code == 504 and fe.client.released == ["r"] and fe.client.sent == []
    _clean(fe)


async def test_a_send_whose_prefill_never_comes_gives_up(worker):
    fe, _, http = worker
    r = await asyncio.wait_for(_send(http), 5 * TIMEOUT_S)
    assert r.status_code == 504 and fe.client.sent == []
    _clean(fe)


async def test_a_router_leaving_mid_prefill_aborts_it_in_the_core(worker):
    fe, _, http = worker
    pending = asyncio.ensure_future(_prefill(http))
    for _ in range(100):
        if "r" in fe.handler.outputs:
            break
        await asyncio.sleep(0.01)
    pending.cancel()
    await asyncio.sleep(0.05)
    assert fe.client.aborted == ["r"] and fe.client.released == ["r"]
    _clean(fe)
