"""Streams survive a dying decode worker (issue 33): the router re-issues the request, with the tokens it has
delivered, to another decode worker, and the client's stream goes on without an error; the migration limit
and an empty pool end it with a clean error. Fake workers whose tokens are their output positions show what
each worker was asked for and that the client saw every position once, in order."""


import httpx
import pytest

from bench.cluster import LocalCluster, wait_http
from tests.helpers import stream_chat
from tests.router.fake_workers import start_fake_worker


@pytest.fixture
def fakes(fake_spec):
    """Three fresh fake workers (their apps, to read what they were sent)."""
    servers = [start_fake_worker(f"m{i}", *fake_spec) for i in range(3)]
    for s in servers:
        wait_http(f"http://127.0.0.1:{s.config.port}/health")
    yield servers
    for s in servers:
        s.should_exit = True


def _router(servers, *flags: str) -> tuple[LocalCluster, str]:
    cluster = LocalCluster.in_front_of([f"http://127.0.0.1:{s.config.port}" for s in servers])
    return cluster, cluster.start_router("--policy", "round_robin", *flags)


def _stream(router: str, max_tokens: int, *stops: str) -> tuple[str, list[dict]]:
    """The streamed text and every event (an error event included), with usage."""
    return stream_chat(router, {"model": "fake", "messages": [{"role": "user", "content": "count"}],
                                "max_tokens": max_tokens, "ignore_eos": True, "stream_options": {"include_usage": True},
                                "stop": ["POSITIONS", *stops]}, timeout=30)


def _metric(router: str, name: str) -> float:
    for line in httpx.get(f"{router}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics")


def _bodies(servers) -> list:
    return [b for s in servers for b in s.config.app.state.bodies]


def test_a_stream_whose_worker_dies_goes_on_from_another(fakes):
    cluster, router = _router(fakes[:2])
    try:
        text, events = _stream(router, 12, "DIE_FRESH_AFTER_5")
        assert text == "".join(f" {i}" for i in range(12))  # every position once, in order
        assert not any("error" in e for e in events)
        assert events[-1]["usage"]["completion_tokens"] == 12
        first, second = sorted(_bodies(fakes[:2]), key=lambda b: len(b.output_token_ids))
        assert first.output_token_ids == [] and second.output_token_ids == [0, 1, 2, 3, 4]
        assert second.prompt_token_ids == first.prompt_token_ids
        assert second.request_id != first.request_id  # a new id: the dead worker's may still be known
        assert _metric(router, "pdserve_migrations_total") == 1
    finally:
        cluster.close()


def test_the_migration_limit_ends_the_stream_with_a_clean_error(fakes):
    cluster, router = _router(fakes, "--migration-limit", "1")
    try:
        text, events = _stream(router, 20, "DIE_AFTER_3")  # every worker dies after 3 tokens of its own
        assert text == "".join(f" {i}" for i in range(6))  # three from each of two workers, nothing twice
        error = events[-1]["error"]
        assert error["code"] == "engine_failed" and "limit is 1" in error["message"], error
        assert sorted(b.output_token_ids for b in _bodies(fakes)) == [[], [0, 1, 2]]
        assert _metric(router, "pdserve_migrations_total") == 1
    finally:
        cluster.close()


def test_no_worker_left_ends_the_stream_with_a_clean_error(fakes):
    cluster, router = _router(fakes[:2], "--migration-wait-s", "1")
    try:
        text, events = _stream(router, 20, "DIE_AFTER_4")
        assert text == "".join(f" {i}" for i in range(8))
        assert events[-1]["error"]["code"] == "no_healthy_worker", events[-1]
    finally:
        cluster.close()


def test_migration_off_fails_the_stream_as_before(fakes):
    cluster, router = _router(fakes[:2], "--migration-limit", "0")
    try:
        text, events = _stream(router, 12, "DIE_FRESH_AFTER_5")
        assert text == "".join(f" {i}" for i in range(5))
        assert events[-1]["error"]["code"] == "engine_failed"
        assert len(_bodies(fakes[:2])) == 1  # neither retried nor migrated: tokens had gone out
    finally:
        cluster.close()


def test_a_lone_decode_worker_that_restarts_takes_its_stream_back(fakes):
    """With one decode worker (`./dev serve`'s default) there is no other to move to: the stream waits for the
    worker to come back as another instance and goes on from it."""
    cluster, router = _router(fakes[:1], "--health-interval-s", "0.2")
    try:
        text, events = _stream(router, 12, "DIE_FRESH_AFTER_5", "RESTARTS")
        assert text == "".join(f" {i}" for i in range(12))
        assert not any("error" in e for e in events)
        assert [b.output_token_ids for b in _bodies(fakes[:1])] == [[], [0, 1, 2, 3, 4]]
    finally:
        cluster.close()
