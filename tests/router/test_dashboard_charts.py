"""The dashboard's charts show what they plot (issue 38's report: under a light load the TTFT chart's axis
reached 763 ms but no line was drawn, and an empty chart labelled its axis in units of 1e-9), in a real browser
(Debian's chromium, headless, driven by Playwright) in front of fake workers: one request makes one sample, an
isolated point, which must be drawn; a chart with no samples says so. The SLA planner's panel shows its
decisions."""

import os
import re
import shutil

import httpx
import pytest

ADMIN = "charts-admin"
CHROMIUM = os.environ.get("PDSERVE_CHROMIUM", "/usr/bin/chromium")
# Pixels of a colour on a canvas (the p99 line is amber, #f59e0b).
COUNT_COLOUR = """([id, rgb]) => {
  const c = document.getElementById(id), d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (d[i + 3] > 200 && Math.abs(d[i] - rgb[0]) + Math.abs(d[i + 1] - rgb[1]) + Math.abs(d[i + 2] - rgb[2]) < 60) n++;
  return n;
}"""


def test_one_sample_is_drawn_and_an_empty_chart_says_it_has_no_data_and_the_planner_shows(routers, tmp_path):
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"no browser at {CHROMIUM} (./dev test installs Debian's chromium)")
        pytest.skip(f"no browser at {CHROMIUM}")
    from playwright.sync_api import expect, sync_playwright

    from bench.planner import ILLUSTRATIVE

    ILLUSTRATIVE.dump(tmp_path / "profile.json")
    router = routers("--admin-token", ADMIN, "--planner", "dry-run", "--planner-profile", str(tmp_path / "profile.json"),
                     "--planner-interval-s", "0.3")
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{router}/v1/chat/completions", json=chat, timeout=30) as r:
        assert r.status_code == 200 and b"[DONE]" in r.read()  # one token: a TTFT sample, no ITL sample
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{router}/dashboard#token={ADMIN}")
        ttft = page.locator("#chart-ttft")
        expect(ttft).to_have_attribute("aria-label", re.compile(r"^p50: latest [0-9.]+, highest "
                                                                               r"[0-9.]+; p99: latest .* \(ms\)$"),
                                       timeout=15_000)
        assert page.evaluate(COUNT_COLOUR, ["chart-ttft", [245, 158, 11]]) > 4  # the lone sample is drawn
        expect(page.locator("#chart-itl")).to_have_attribute("aria-label", "no data yet")
        assert page.evaluate(COUNT_COLOUR, ["chart-itl", [245, 158, 11]]) == 0
        assert "e-" not in page.locator("#chart-rps").get_attribute("aria-label")
        # The SLA planner's panel (dry run): its mode and its first decision, the prefill pool from 0 to 1.
        expect(page.locator("#planner .planner-mode")).to_have_text("(dry-run, leading)")
        first = page.locator("#planner-decisions tbody tr").last
        expect(first).to_contain_text("(not acted on)")
        expect(first.locator("td").nth(1)).to_have_text("0 → 1")
        browser.close()
