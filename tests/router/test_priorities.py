"""Priorities through the router (issue 39): a key's priority (lower values go first) and a request's own, if
its key allows it, reach the workers with the key as the tenant their schedulers share fairly by (the
scheduling itself: tests/engine/test_priorities.py); a request asking to go ahead of its key is refused."""

import httpx
import pytest

from bench.cluster import LocalCluster

ADMIN = "priorities-admin"
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


@pytest.fixture
def fake(own_fake):
    return own_fake("prio")


def test_key_and_request_priorities_reach_the_workers(fake, tmp_path):
    cluster = LocalCluster.in_front_of([f"http://127.0.0.1:{fake.config.port}"])
    try:
        router = cluster.start_router("--auth", "--admin-token", ADMIN, "--keys-file", str(tmp_path / "keys.json"))
        admin = {"authorization": f"Bearer {ADMIN}"}
        created = httpx.post(f"{router}/admin/keys", json={"name": "batch", "priority": 5}, headers=admin, timeout=10)
        assert created.status_code == 201 and created.json()["priority"] == 5
        auth = {"authorization": f"Bearer {created.json()['key']}"}
        url = f"{router}/v1/chat/completions"
        assert httpx.post(url, json=CHAT, headers=auth, timeout=30).status_code == 200
        assert httpx.post(url, json={**CHAT, "priority": 7}, headers=auth, timeout=30).status_code == 200
        refused = httpx.post(url, json={**CHAT, "priority": 3}, headers=auth, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "priority_not_allowed"
        assert refused.json()["error"]["param"] == "priority"
        sent = fake.config.app.state.bodies
        assert [(b.params.priority, b.params.tenant) for b in sent] == [(5, created.json()["id"])] * 1 + [
            (7, created.json()["id"])]
    finally:
        cluster.close()


def test_without_keys_requests_are_one_tenant(fake):
    cluster = LocalCluster.in_front_of([f"http://127.0.0.1:{fake.config.port}"])
    try:
        router = cluster.start_router()
        assert httpx.post(f"{router}/v1/chat/completions", json={**CHAT, "priority": -2}, timeout=30).status_code == 200
        assert [(b.params.priority, b.params.tenant) for b in fake.config.app.state.bodies] == [(-2, "")]
    finally:
        cluster.close()
