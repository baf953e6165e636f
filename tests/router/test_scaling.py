"""The scaling API's contract (admin token, counts), the Kubernetes back end against a fake API, and the
scaling advice."""

from types import SimpleNamespace

import httpx
import pytest

from protocol.messages import WorkerLoad
from router.scaling import KubernetesScaler, advise
from router.telemetry import Telemetry
from router.workers import Worker

ADMIN = "scale-admin"


class FakeApps:
    """The two AppsV1Api calls the scaler makes, recording the patches."""

    def __init__(self):
        self.replicas = {"rel-prefill": 1, "rel-decode": 2}
        self.patches = []

    def read_namespaced_stateful_set_scale(self, name, namespace):
        return SimpleNamespace(spec=SimpleNamespace(replicas=self.replicas[name]))

    def patch_namespaced_stateful_set_scale(self, name, namespace, body):
        self.patches.append((name, namespace, body))
        self.replicas[name] = body["spec"]["replicas"]


async def test_kubernetes_scaler_patches_the_pools_statefulset():
    api = FakeApps()
    scaler = KubernetesScaler("ns", {"prefill": "rel-prefill", "decode": "rel-decode"}, api=api)
    assert await scaler.replicas("decode") == 2
    await scaler.scale("decode", 5)
    assert api.patches == [("rel-decode", "ns", {"spec": {"replicas": 5}})]
    assert await scaler.replicas("decode") == 5 and await scaler.replicas("prefill") == 1


def test_pool_api_needs_the_admin_token_and_sane_counts(routers):
    router = routers("--admin-token", ADMIN)
    auth = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.get(f"{router}/admin/pools/decode").status_code == 401
    assert httpx.put(f"{router}/admin/pools/decode", json={"replicas": 2}).status_code == 401
    pool = httpx.get(f"{router}/admin/pools/decode", headers=auth).json()
    assert pool["replicas"] == 4 and pool["healthy"] == 4 and not pool["scalable"]
    for bad in ({"replicas": -1}, {"replicas": "2"}, {"replicas": 2.5}, {"replicas": 5000}, {}):
        r = httpx.put(f"{router}/admin/pools/decode", json=bad, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (bad, r.text)
    assert httpx.put(f"{router}/admin/pools/other", json={"replicas": 1}, headers=auth).status_code == 404
    r = httpx.put(f"{router}/admin/pools/decode", json={"replicas": 3}, headers=auth)
    assert r.status_code == 409 and r.json()["error"]["code"] == "scaling_unavailable"  # a static worker list


def _decode(n: int, used: float, waiting: int = 0) -> list[Worker]:
    return [Worker(f"http://d{i}", "decode", healthy=True, load=WorkerLoad(
        running=8, waiting=waiting, free_blocks=int(100 * (1 - used)), total_blocks=100, tokens_computed=0,
        prompt_tokens_cached=0)) for i in range(n)]


@pytest.mark.parametrize(("used", "waiting", "expected"), [(0.95, 0, 3), (0.5, 8, 4), (0.5, 0, 2), (0.1, 0, 1)])
def test_advice_follows_kv_use_and_queues(used, waiting, expected):
    pool = SimpleNamespace(pool=lambda role: _decode(2, used, waiting) if role == "decode" else [],
                           predicted_ttft_s=lambda tokens: None)
    advice = advise(pool, Telemetry(), ttft_slo_s=2.0, itl_slo_s=0.1)
    assert advice["decode"]["current"] == 2 and advice["decode"]["recommended"] == expected
    assert advice["decode"]["reasons"] and advice["prefill"]["recommended"] == 0
