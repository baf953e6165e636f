"""A decode worker that dies: the request it fails before its first token is retried on another worker, the
dead worker is skipped until a health check passes, and then it serves again."""

import socket

import httpx
import pytest

from bench.cluster import LocalCluster, wait_http, wait_until
from tests.router.fake_workers import start_fake_worker


def _served_by(router: str) -> str:
    r = httpx.post(f"{router}/v1/chat/completions", timeout=10,
                   json={"model": "fake", "messages": [{"role": "user", "content": "who answers?"}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _retries(router: str) -> float:
    for line in httpx.get(f"{router}/metrics").text.splitlines():
        if line.startswith("pdserve_retries_total"):
            return float(line.split()[-1])
    raise AssertionError("no pdserve_retries_total in /metrics")


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def victim(own_fake):
    return own_fake("victim")


def test_a_dead_worker_is_skipped_its_failed_request_retried_and_it_serves_again_once_healthy(
        victim, fake_spec, fake_urls):
    live = fake_urls[0]
    port = victim.config.port
    cluster = LocalCluster.in_front_of([f"http://127.0.0.1:{port}", live])
    try:
        # Round-robin sends every other request to each worker; health polls every 2 s.
        router = cluster.start_router("--policy", "round_robin", "--health-interval-s", "2")
        assert {_served_by(router) for _ in range(4)} == {"victim", "fake-0"}
        # Kill it right after a health poll, so the next poll is ~2 s away: the router learns of the death
        # from a request, not from the poll.
        app = victim.config.app
        polls = app.state.polls
        wait_until(lambda: app.state.polls > polls, 5, "a health poll")
        victim.should_exit = True
        wait_until(lambda: _port_closed(port), 5, "the victim to stop")
        # Round-robin sends one of the next two requests to the dead worker: it fails at the connection, is
        # retried on the live worker, and the dead worker leaves the pool. Nothing reaches the client.
        answers = [_served_by(router) for _ in range(6)]
        assert answers == ["fake-0"] * 6
        assert _retries(router) == 1
        # Back on its port, it passes a health check and serves again.
        revived = start_fake_worker("victim", *fake_spec, port=port)
        try:
            wait_http(f"http://127.0.0.1:{port}/health")
            wait_until(lambda: _served_by(router) == "victim", 10, "the revived worker to serve")
            assert _retries(router) == 1
        finally:
            revived.should_exit = True
    finally:
        cluster.close()
