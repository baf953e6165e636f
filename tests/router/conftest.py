"""Routers in front of fake workers, for tests of the router alone."""

import os
import uuid

import pytest

from bench.cluster import LocalCluster, wait_http
from protocol.block_hash import root_hash

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def require_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no Redis at {REDIS_URL}: {e}")


@pytest.fixture(scope="module")
def fake_spec(demo_gguf) -> tuple[dict[str, str], dict]:
    """What a fake worker serves: the demo model's tokenizer files and its /info."""
    from engine.tokenizer_files import read_tokenizer_files, tokenizer_dir

    info = {"role": "decode", "model": "fake", "block_size": 16, "root_hash": root_hash("fake"),
            "max_model_len": 4096, "tokenizer_hash": "t"}
    return read_tokenizer_files(tokenizer_dir(demo_gguf)), info


@pytest.fixture(scope="module")
def fake_urls(fake_spec):
    from tests.router.fake_workers import start_fake_workers

    urls = start_fake_workers(4, *fake_spec)
    for u in urls:
        wait_http(f"{u}/health")
    return urls


@pytest.fixture
def own_fake(fake_spec):
    """own_fake(name) -> a fake worker of the test's own, serving (its app records what it was sent); all
    stopped after the test."""
    from tests.router.fake_workers import start_fake_worker

    servers = []

    def start(name: str):
        server = start_fake_worker(name, *fake_spec)
        wait_http(f"http://127.0.0.1:{server.config.port}/health")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.should_exit = True


@pytest.fixture
def routers(fake_urls):
    """start(*flags) -> a router URL in front of the fake workers; all stopped after the test."""
    cluster = LocalCluster.in_front_of(fake_urls)
    yield cluster.start_router
    cluster.close()


@pytest.fixture
def redis_namespace():
    require_redis()
    return f"pdserve-test-{uuid.uuid4().hex}"
