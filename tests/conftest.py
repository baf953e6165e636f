import os

import pytest

from tests.helpers import demo_model_path


def pytest_collection_modifyitems(config, items):
    _group_for_xdist(items)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Benches' --quick runs are independent subprocesses: under xdist each may run on any worker.
_ANY_WORKER = ("tests/bench/test_quick_modes.py::",)


def _group_for_xdist(items) -> None:
    """Under `pytest -n N --dist loadgroup` (./dev test), a file's tests share one worker, so its module
    fixtures (clusters, routers) start once; tests that share nothing run wherever a worker is free."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            group = item.nodeid if item.nodeid.startswith(_ANY_WORKER) else item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def demo_gguf():
    try:
        return demo_model_path()
    except FileNotFoundError as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(e))  # e.g. on the GPU machine, where the 98 MB file cannot travel


@pytest.fixture(scope="session")
def demo_engine(demo_gguf):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(demo_gguf), kv_cache_bytes=64 << 20))


@pytest.fixture(scope="session")
def demo_hf(demo_gguf):
    """transformers' own reading of the same GGUF file: the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)
    return model.eval(), tok


@pytest.fixture(scope="session")
def redis_url():
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def cluster(demo_gguf):
    """One prefill and one decode worker with the demo model; routers are added by the tests that need them."""
    from bench.cluster import LocalCluster

    c = LocalCluster(str(demo_gguf), prefill=1, decode=1)
    yield c
    c.close()


@pytest.fixture(scope="session")
def router_url(cluster):
    """A router that sends every prompt through the prefill worker (no local prefill)."""
    return cluster.start_router("--local-prefill-tokens", "0")


@pytest.fixture(scope="session")
def demo_model_name(demo_gguf):
    return demo_gguf.stem
