"""A real local cluster on loopback (worker and router processes), for tests and benchmarks."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from pdserve_cli.main import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_http(url: str, timeout_s: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up in {timeout_s} s")


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.02) -> None:
    """Poll condition() until it holds; TimeoutError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll_s)


class LocalCluster:
    def __init__(self, model: str, prefill: int = 1, decode: int = 1, kv_cache_bytes: int | None = 64 << 20,
                 worker_args: tuple[str, ...] = (), start_timeout_s: float = 120.0, gpus: list[int] | None = None):
        """gpus: the GPU of each worker, prefill workers first (CUDA_VISIBLE_DEVICES); None: all see all."""
        self.model = model
        self.procs: list[subprocess.Popen] = []
        self.prefill_urls: list[str] = []
        self.decode_urls: list[str] = []
        self.worker_procs: dict[str, subprocess.Popen] = {}
        self.routers: list[tuple[str, subprocess.Popen]] = []
        args = list(worker_args)
        token = args[args.index("--internal-token") + 1] if "--internal-token" in args else None
        self.headers = {"x-pdserve-token": token} if token else {}  # to read workers' /load
        for role, count in (("prefill", prefill), ("decode", decode)):
            for _ in range(count):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                env = {} if gpus is None else {"CUDA_VISIBLE_DEVICES": str(gpus[len(self.worker_procs)])}
                kv = ["--kv-cache-bytes", str(kv_cache_bytes)] if kv_cache_bytes else []  # None: sized by the worker
                proc = self._spawn(["-m", "worker.serve", "--role", role, "--model", model, "--port", str(port),
                                    *kv, *worker_args], env)
                (self.prefill_urls if role == "prefill" else self.decode_urls).append(url)
                self.worker_procs[url] = proc
        try:
            for url, proc in self.worker_procs.items():
                wait_http(f"{url}/health", timeout_s=start_timeout_s, proc=proc)
        except BaseException:  # one worker failed to start: stop the ones that did, leave nothing behind
            self.close()
            raise

    @classmethod
    def in_front_of(cls, decode_urls: list[str], prefill_urls: list[str] = ()) -> "LocalCluster":
        """Routers only (start_router), in front of workers started elsewhere (fakes, mocks)."""
        c = cls.__new__(cls)
        c.model, c.procs, c.worker_procs, c.routers, c.headers = None, [], {}, [], {}
        c.prefill_urls, c.decode_urls = list(prefill_urls), list(decode_urls)
        return c

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_router(self, *extra: str) -> str:
        port = free_port()
        args = ["-m", "router.main", "--port", str(port), *extra]
        for u in self.prefill_urls:
            args += ["--prefill", u]
        for u in self.decode_urls:
            args += ["--decode", u]
        proc = self._spawn(args)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/health", proc=proc)
        except BaseException:
            self.close()
            raise
        self.routers.append((url, proc))
        return url

    def kill_worker(self, url: str) -> None:
        proc = self.worker_procs[url]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def load(self, url: str) -> dict:
        return httpx.get(f"{url}/load", timeout=5, headers=self.headers).json()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each router and worker process has used so far, its children included."""
        named = [(f"router{i}", p) for i, (_, p) in enumerate(self.routers)]
        named += [(f"prefill{i}", self.worker_procs[u]) for i, u in enumerate(self.prefill_urls)]
        named += [(f"decode{i}", self.worker_procs[u]) for i, u in enumerate(self.decode_urls)]
        out = {}
        for name, proc in named:
            try:
                ps = psutil.Process(proc.pid)
                times = [ps.cpu_times(), *(c.cpu_times() for c in ps.children(recursive=True))]
            except psutil.Error:  # gone
                continue
            out[name] = sum(t.user + t.system for t in times)
        return out

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def embedded_cluster(*flags: str, kv_cache_bytes: int = 64 << 20):
    """`pdserve serve` (the demo model unless flags name one) on a free port with these flags: yields (its URL, its
    process) once it answers, and stops it (the whole process group if it will not stop)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdserve_cli.main", "serve", "--port", str(port),
                             "--kv-cache-bytes", str(kv_cache_bytes), *flags], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout_s=180, proc=proc)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def worker_processes(cluster: subprocess.Popen, url: str) -> tuple[psutil.Process, psutil.Process]:
    """(engine core, frontend) of the embedded cluster's worker serving at url: the frontend listens on its
    port; its parent (a Ray actor) runs the engine core."""
    port = int(url.rsplit(":", 1)[1])
    for p in psutil.Process(cluster.pid).children(recursive=True):
        try:
            if "--ipc-fd" in p.cmdline() and any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                                                 for c in p.net_connections("tcp")):
                return p.parent(), p
        except psutil.Error:
            continue
    raise LookupError(f"no worker process listens at {url}")
