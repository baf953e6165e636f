"""Where the workers are: a static list, or the Ready pods of the prefill and decode pools in Kubernetes."""

import asyncio
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Discovered:
    prefill_urls: list[str]
    decode_urls: list[str]


class StaticDiscovery:
    def __init__(self, prefill_urls: list[str], decode_urls: list[str]):
        self.result = Discovered(list(prefill_urls), list(decode_urls))

    async def discover(self) -> Discovered:
        return self.result

    def add(self, role: str, url: str) -> None:
        (self.result.prefill_urls if role == "prefill" else self.result.decode_urls).append(url)

    def remove(self, role: str, url: str) -> None:
        urls = self.result.prefill_urls if role == "prefill" else self.result.decode_urls
        if url in urls:
            urls.remove(url)


class KubernetesDiscovery:
    """Ready pods matching each pool's label selector, as http://POD_IP:PORT. `api` is a CoreV1Api (or
    anything with its list_namespaced_pod); by default the in-cluster config is loaded."""

    def __init__(self, namespace: str, prefill_selector: str, decode_selector: str, port: int, api: Any = None):
        if api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            api = client.CoreV1Api()
        self.api = api
        self.namespace = namespace
        self.selectors = (prefill_selector, decode_selector)
        self.port = port

    def _ready_urls(self, selector: str) -> list[str]:
        pods = self.api.list_namespaced_pod(self.namespace, label_selector=selector).items
        urls = []
        for pod in pods:
            if pod.metadata.deletion_timestamp is not None or not pod.status or not pod.status.pod_ip:
                continue  # terminating (draining) or not scheduled yet
            ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
            if ready:
                urls.append(f"http://{pod.status.pod_ip}:{self.port}")
        return sorted(urls)

    async def discover(self) -> Discovered:
        # The client is synchronous: list in a thread so the router's loop keeps serving.
        prefill, decode = await asyncio.gather(*(asyncio.to_thread(self._ready_urls, s) for s in self.selectors))
        return Discovered(prefill, decode)
