"""Workers are found as the Ready pods of each pool, through the kubernetes client (a fake API here)."""

from datetime import UTC, datetime

from kubernetes.client import V1ObjectMeta, V1Pod, V1PodCondition, V1PodList, V1PodStatus

from protocol.stream_client import StreamClient
from router.discovery import KubernetesDiscovery
from router.state import LocalState
from router.workers import WorkerPool


class FakeCoreV1Api:
    """Answers list_namespaced_pod like the real API, from a dict of label selector -> pods."""

    def __init__(self) -> None:
        self.pods: dict[str, list[V1Pod]] = {}
        self.calls: list[tuple[str, str]] = []

    def list_namespaced_pod(self, namespace: str, label_selector: str) -> V1PodList:
        self.calls.append((namespace, label_selector))
        return V1PodList(items=self.pods.get(label_selector, []))


def _pod(name: str, ip: str | None, ready: bool, terminating: bool = False) -> V1Pod:
    return V1Pod(metadata=V1ObjectMeta(name=name, deletion_timestamp=datetime.now(UTC) if terminating else None),
                 status=V1PodStatus(pod_ip=ip, conditions=[V1PodCondition(type="Ready",
                                                                          status="True" if ready else "False")]))


async def test_ready_pods_of_each_pool_become_workers_and_leave_when_gone():
    api = FakeCoreV1Api()
    api.pods["component=prefill"] = [_pod("p0", "10.0.0.1", True), _pod("p1", "10.0.0.2", False)]
    api.pods["component=decode"] = [_pod("d0", "10.0.1.1", True), _pod("d1", None, False),
                                    _pod("d2", "10.0.1.3", True, terminating=True)]
    discovery = KubernetesDiscovery("serving", "component=prefill", "component=decode", 8100, api=api)
    pool = WorkerPool(discovery, StreamClient(), LocalState(100))
    await pool.sync()
    assert sorted((w.role, w.url) for w in pool.workers) == [("decode", "http://10.0.1.1:8100"),
                                                            ("prefill", "http://10.0.0.1:8100")]
    assert set(api.calls) == {("serving", "component=prefill"), ("serving", "component=decode")}
    # Scale the decode pool up and the prefill pool down.
    api.pods["component=decode"].append(_pod("d3", "10.0.1.4", True))
    api.pods["component=prefill"] = []
    await pool.sync()
    assert sorted((w.role, w.url) for w in pool.workers) == [("decode", "http://10.0.1.1:8100"),
                                                            ("decode", "http://10.0.1.4:8100")]
