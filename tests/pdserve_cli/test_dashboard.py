"""The operator dashboard of an embedded cluster (`pdserve serve`), in a real browser (Debian's chromium,
headless, driven by Playwright): both pools and their workers show, the decode pool grows from 1 to 2 with
its button and the new worker becomes healthy and takes traffic; shrinking it under load drains a worker
without losing a request. A screenshot under load is saved to artifacts/dashboard.png."""

import asyncio
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.cluster import ROOT, embedded_cluster

pytestmark = pytest.mark.slow
ADMIN = "dashboard-admin-token"
CHROMIUM = os.environ.get("PDSERVE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(ROOT) / "artifacts"


@pytest.fixture(scope="module")
def embedded(demo_gguf):
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"no browser at {CHROMIUM} (./dev test installs Debian's chromium)")
        pytest.skip(f"no browser at {CHROMIUM}")
    with embedded_cluster("--admin-token", ADMIN) as (url, _):
        yield url, demo_gguf.stem


def _pool(url: str, pool: str) -> dict:
    return httpx.get(f"{url}/admin/pools/{pool}", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10).json()


async def _load(url: str, model: str, seconds: float, concurrency: int = 8,
                spans: list[tuple[float, float]] | None = None) -> list[str]:
    """Streamed chat requests for `seconds`; each outcome: 'ok' (200 and [DONE]) or what went wrong (and each
    request's (start, end) monotonic times into `spans`, if given)."""
    outcomes: list[str] = []
    deadline = time.monotonic() + seconds

    async def client(k: int) -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            i = 0
            while time.monotonic() < deadline:
                body = {"model": model, "stream": True, "max_tokens": 12, "temperature": 0.8, "seed": k * 1000 + i,
                        "messages": [{"role": "user", "content": f"Tell me about pools, part {k}-{i}."}]}
                start = time.monotonic()
                async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    text = (await r.aread()).decode()
                    outcomes.append("ok" if r.status_code == 200 and "[DONE]" in text and '"error"' not in text
                                    else f"{r.status_code}: {text[-200:]}")
                if spans is not None:
                    spans.append((start, time.monotonic()))
                i += 1

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return outcomes


def test_dashboard_shows_pools_and_scales_decode_with_its_button(embedded):
    from playwright.sync_api import expect, sync_playwright

    url, model = embedded
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/dashboard#token={ADMIN}")
        decode_rows = page.locator("#pool-decode tr.worker-row")
        expect(page.locator("#pool-prefill tr.worker-row")).to_have_count(1, timeout=15_000)
        expect(decode_rows).to_have_count(1)
        expect(decode_rows.first.locator("td[data-health]")).to_have_text("healthy")
        first = decode_rows.first.get_attribute("data-url")
        page.locator("#pool-decode button.scale-up").click()
        expect(page.locator("#pool-decode .pool-count")).to_contain_text("of 2 wanted", timeout=10_000)
        expect(decode_rows).to_have_count(2, timeout=120_000)  # a new actor loads the model
        expect(page.locator('#pool-decode td[data-health="healthy"]')).to_have_count(2, timeout=60_000)
        # The new worker takes traffic: load for a while, and its token counter moves.
        with ThreadPoolExecutor(1) as pool:  # Playwright's sync API owns this thread's event loop
            loading = pool.submit(asyncio.run, _load(url, model, 12.0))
            page.wait_for_timeout(3000)  # a few refreshes with the load on
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            busy: list[str] = []  # what the running column showed, sampled while the load lasts
            while not loading.done():
                busy += page.locator('#pool-decode tr.worker-row td:nth-child(4)').all_inner_texts()
                page.wait_for_timeout(250)
            outcomes = loading.result()
        assert outcomes and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
        workers = {w["url"]: w for w in _pool(url, "decode")["workers"]}
        new = next(u for u in workers if u != first)
        assert workers[new]["tokens_computed"] > 0 and workers[first]["tokens_computed"] > 0
        assert any(b not in ("0", "–") for b in busy), sorted(set(busy))  # the table showed running requests
        assert page.locator("#status").inner_text() == ""  # no error shown
        browser.close()


def test_draining_a_decode_worker_under_load_loses_no_request(embedded):
    url, model = embedded
    auth = {"authorization": f"Bearer {ADMIN}"}
    if _pool(url, "decode")["healthy"] < 2:
        httpx.put(f"{url}/admin/pools/decode", json={"replicas": 2}, headers=auth, timeout=10)
        deadline = time.monotonic() + 180
        while _pool(url, "decode")["healthy"] < 2 and time.monotonic() < deadline:
            time.sleep(0.5)

    spans: list[tuple[float, float]] = []
    drained: list[float] = []

    async def scenario() -> list[str]:
        load = asyncio.create_task(_load(url, model, 10.0, spans=spans))
        await asyncio.sleep(3)
        async with httpx.AsyncClient() as c:
            drained.append(time.monotonic())
            r = await c.put(f"{url}/admin/pools/decode", json={"replicas": 1}, headers=auth, timeout=10)
            assert r.status_code == 202
        return await load

    outcomes = asyncio.run(scenario())
    assert set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
    # Requests were in flight as the drain began (8 streams: whichever worker was drained held some), and more
    # came after it.
    assert sum(s < drained[0] < e for s, e in spans) >= 4 and sum(s > drained[0] for s, _ in spans) >= 4, spans
    deadline = time.monotonic() + 60
    while len(_pool(url, "decode")["workers"]) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    pool = _pool(url, "decode")
    assert pool["replicas"] == 1 and len(pool["workers"]) == 1 and pool["healthy"] == 1
